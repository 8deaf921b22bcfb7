"""Contacts with megatron-core internals that are not a stable public API, across the versions we support.

We support megatron-core 0.16 (our lock) through 0.19 (current NGC containers). Where megatron-core
changed an internal we rely on, the difference is handled here, and ``tests/test_mcore_internals.py``
pins what each function expects of the installed release, so an upgrade fails in CI naming the seam
instead of misbehaving in a long run.

Seams handled here so far:

* ``GPTModel._postprocess``'s keyword arguments and the MTP block call made from it (0.19 added
  ``padding_mask``, ``output_processor``, ``output_processor_context``);
* the class-global MTP loss tracker (``MTPLossLoggingHelper.tracker``): 0.16 stores per-depth losses
  under ``"values"`` via ``save_loss_to_tracker``; 0.19 stores ``"loss_values"`` (plus acceptance
  counts) via ``save_metrics_to_tracker``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

# _postprocess keyword arguments that GPTModel passes on to its MTP block (when present in the release)
_MTP_BLOCK_KWARGS = ("attention_mask", "inference_params", "packed_seq_params", "sequence_len_offset", "padding_mask")
# _postprocess keyword arguments every supported release passes (pinned by the tests)
POSTPROCESS_KWARGS = ("mtp_in_postprocess", "loss_mask", "decoder_input", "attention_mask", "inference_params",
                      "packed_seq_params", "sequence_len_offset", "runtime_gather_output", "extra_block_kwargs",
                      "inference_context")


def mtp_block_inputs(postprocess_kwargs: dict, **inputs) -> dict:
    """Keyword arguments for ``GPTModel.mtp(...)`` as megatron-core's own ``_postprocess`` builds them.

    ``inputs`` are the tensors named explicitly (input_ids, hidden_states, rotary embeddings, embedding);
    the rest comes from the keyword arguments ``_postprocess`` received, whichever the release passes."""
    out = {k: postprocess_kwargs[k] for k in _MTP_BLOCK_KWARGS if k in postprocess_kwargs}
    out.setdefault("attention_mask", None)
    out.update(inputs)
    out.update(postprocess_kwargs.get("extra_block_kwargs") or {})
    return out


# key of the per-depth loss sums in MTPLossLoggingHelper.tracker, by API generation
_TRACKER_LOSS_KEYS = ("values", "loss_values")


def mtp_tracker_api() -> str:
    """Which MTP tracker API the installed megatron-core has: ``"loss"`` (<= 0.18) or ``"metrics"`` (0.19)."""
    if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker"):
        return "metrics"
    if hasattr(MTPLossLoggingHelper, "save_loss_to_tracker"):
        return "loss"
    raise RuntimeError("megatron-core's MTPLossLoggingHelper has neither save_loss_to_tracker (<= 0.18) nor "
                       "save_metrics_to_tracker (0.19): tri_megatron.mcore_internals needs updating for this release")


def record_mtp_loss(loss: torch.Tensor, depth_index: int, depth: int, avg_group=None) -> None:
    """Adds one micro-batch's mean MTP loss of head ``depth_index`` (0-based) to megatron's tracker."""
    if mtp_tracker_api() == "metrics":
        zero = torch.zeros((), device=loss.device, dtype=loss.dtype)  # no acceptance counts from our path
        MTPLossLoggingHelper.save_metrics_to_tracker(loss, zero, zero, depth_index, depth, avg_group=avg_group)
    else:
        MTPLossLoggingHelper.save_loss_to_tracker(loss, depth_index, depth, avg_group=avg_group)


def take_mtp_losses() -> Optional[torch.Tensor]:
    """The per-depth MTP loss sums recorded since the last call (a detached copy), then zeroes them.

    None when nothing was recorded (no MTP, or not the last pipeline stage)."""
    tracker = MTPLossLoggingHelper.tracker
    key = next((k for k in _TRACKER_LOSS_KEYS if k in tracker), None)
    if key is None:
        return None
    values = tracker[key].detach().clone()
    clear_mtp_tracker()
    return values


def clear_mtp_tracker() -> None:
    """Zeroes megatron's class-global MTP tracker (it outlives a model: tests build many)."""
    if mtp_tracker_api() == "metrics":
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    elif any(k in MTPLossLoggingHelper.tracker for k in _TRACKER_LOSS_KEYS):
        MTPLossLoggingHelper.clean_loss_in_tracker()
