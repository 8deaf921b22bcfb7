"""MTP: GPTModel._postprocess's keyword arguments and the MTP block call, MTP loss normalisation and the class-
global MTP loss tracker.

Part of the megatron-core seam (``tri_megatron.mcore_internals``: see its docstring for every seam).
"""

from __future__ import annotations

from typing import Optional

import torch

from tri_megatron.mcore_internals.release import SeamError, _release


# ================================================================ GPTModel._postprocess and the MTP block
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


def mtp_roll_left(tensor: torch.Tensor, cp_group=None, packed_seq_params=None):
    """megatron's MTP label / mask shift by one token to the left (``roll_tensor``, CP- and packing-aware).

    Returns ``(rolled, count)``: ``count`` is the sum of the rolled tensor (the tokens of a rolled mask)."""
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    return roll_tensor(tensor, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)


def normalize_mtp_loss(scaled_loss, per_token_loss: bool, num_tokens: torch.Tensor,
                       original_num_tokens: torch.Tensor):
    """Depth d's ``mtp_loss_scaling_factor / D`` x masked per-token loss (or that factor alone), normalised
    as megatron-core does before attaching it to the backward, with the same arithmetic: ``num_tokens`` the
    rolled mask's tokens, ``original_num_tokens`` the loss mask's before any roll.

    Up to 0.18 (``GPTModel._postprocess``): unchanged with ``calculate_per_token_loss``, else
    ``/ num_tokens``. 0.19 (``multi_token_prediction.process_mtp_loss``): ``* (original / max(num_tokens,
    1))`` with ``calculate_per_token_loss`` (finalize_model_grads divides by the main loss's tokens), else
    ``/ max(num_tokens, 1)``."""
    if _release() >= (0, 19):
        safe = torch.clamp(num_tokens, min=1)
        return scaled_loss * (original_num_tokens / safe) if per_token_loss else scaled_loss / safe
    return scaled_loss if per_token_loss else scaled_loss / num_tokens


def mtp_loss_for_log(mtp_loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Depth d's logged mean loss as megatron-core computes it: ``sum / num_tokens`` up to 0.18, 0.19 gives
    0 (not NaN) for a micro-batch without MTP tokens."""
    if _release() >= (0, 19):
        return mtp_loss_sum * (num_tokens > 0).to(mtp_loss_sum.dtype) / torch.clamp(num_tokens, min=1)
    return mtp_loss_sum / num_tokens


def mtp_heads_detached(config) -> bool:
    """0.19's ``mtp_detach_heads``: the MTP heads' output weight gets no gradient (absent up to 0.18)."""
    return bool(getattr(config, "mtp_detach_heads", False))


def attach_mtp_loss(main_loss: torch.Tensor, mtp_loss: torch.Tensor) -> torch.Tensor:
    """``main_loss`` unchanged in value; in backward ``mtp_loss`` gets megatron's MTP gradient scale
    (``MTPLossAutoScaler``: the main loss's upstream gradient times the scale the schedule sets)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    return MTPLossAutoScaler.apply(main_loss, mtp_loss)


# ====================================================================== the class-global MTP loss tracker
# key of the per-depth loss sums in MTPLossLoggingHelper.tracker, by API generation
_TRACKER_LOSS_KEYS = ("values", "loss_values")


def _mtp_logging_helper():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return MTPLossLoggingHelper


def mtp_tracker_api() -> str:
    """Which MTP tracker API the installed megatron-core has: ``"loss"`` (<= 0.18) or ``"metrics"`` (0.19)."""
    helper = _mtp_logging_helper()
    if hasattr(helper, "save_metrics_to_tracker"):
        return "metrics"
    if hasattr(helper, "save_loss_to_tracker"):
        return "loss"
    raise SeamError("MTPLossLoggingHelper tracker", "neither save_loss_to_tracker (<= 0.18) nor "
                    "save_metrics_to_tracker (0.19)")


def record_mtp_loss(loss: torch.Tensor, depth_index: int, depth: int, avg_group=None) -> None:
    """Adds one micro-batch's mean MTP loss of head ``depth_index`` (0-based) to megatron's tracker."""
    helper = _mtp_logging_helper()
    if mtp_tracker_api() == "metrics":
        zero = torch.zeros((), device=loss.device, dtype=loss.dtype)  # no acceptance counts from our path
        helper.save_metrics_to_tracker(loss, zero, zero, depth_index, depth, avg_group=avg_group)
    else:
        helper.save_loss_to_tracker(loss, depth_index, depth, avg_group=avg_group)


def take_mtp_losses() -> Optional[torch.Tensor]:
    """The per-depth MTP loss sums recorded since the last call (a detached copy), then zeroes them.

    None when nothing was recorded (no MTP, or not the last pipeline stage)."""
    tracker = _mtp_logging_helper().tracker
    key = next((k for k in _TRACKER_LOSS_KEYS if k in tracker), None)
    if key is None:
        return None
    values = tracker[key].detach().clone()
    clear_mtp_tracker()
    return values


def clear_mtp_tracker() -> None:
    """Zeroes megatron's class-global MTP tracker (it outlives a model: tests build many)."""
    helper = _mtp_logging_helper()
    if mtp_tracker_api() == "metrics":
        helper.clean_metrics_in_tracker()
    elif any(k in helper.tracker for k in _TRACKER_LOSS_KEYS):
        helper.clean_loss_in_tracker()
