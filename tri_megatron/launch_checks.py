"""Checks of a launch that need more than the flags: the padded vocabulary against the TP size and the
``--load`` checkpoint against the model. Shared by ``pretrain_tri.py`` (before anything is built) and
``--dry-run``; each raises ``ArgumentError`` with one line naming the flag and the fix."""

from __future__ import annotations

from tri_megatron.arguments import ArgumentError


def check_vocab_and_load(args, load_hint: str = "") -> None:
    """Raise ArgumentError when the vocabulary does not split over TP or --load does not fit the model."""
    from tri_megatron.model.config import padded_vocab_size

    try:
        padded_vocab_size(args.vocab_size, args.tensor_model_parallel_size)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if args.load:
        from tri_megatron.training.checkpointing import check_compatible, find_latest_checkpoint

        try:
            check_compatible(find_latest_checkpoint(args.load), args)
        except ValueError as e:
            raise ArgumentError(str(e) + load_hint) from None
