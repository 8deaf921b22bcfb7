"""The launch check that needs a checkpoint's metadata: does the ``--load`` checkpoint fit the model?
Shared by ``pretrain_tri.py`` (before anything is built) and ``--dry-run``; raises ``ArgumentError``
with one line naming the flag and the fix."""

from __future__ import annotations

from tri_megatron.config.errors import ArgumentError


def check_load_fits(cfg, load_hint: str = "") -> None:
    """Raise ArgumentError when the checkpoint --load resolves to does not fit ``cfg.arch``."""
    if cfg.checkpoint.load:
        from tri_megatron.training.checkpointing import check_compatible, find_latest_checkpoint

        try:
            check_compatible(find_latest_checkpoint(cfg.checkpoint.load), cfg.arch)
        except ValueError as e:
            raise ArgumentError(str(e) + load_hint) from None
