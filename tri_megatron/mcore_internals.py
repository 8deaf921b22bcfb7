"""Every contact with megatron-core internals that are not a stable public API, across the releases we support.

We support megatron-core 0.16 (our lock) through 0.19 (current NGC containers). Each seam below is one
small function (or context) that the rest of tri_megatron calls instead of touching the internal itself;
``tests/test_mcore_internals.py`` pins what each one relies on in the installed release (signatures,
attribute names, behaviour), so an upgrade fails in CI with a message naming the seam instead of
misbehaving in a long run. Verified with 0.16.1 and 0.19.0. One file on purpose (issue 13: one module owns
every contact), in sections following the list below.

Model (``model/fused_loss.py``, ``model/config.py``, ``model/attention.py``):

* ``GPTModel._postprocess`` (private, overridden by ``FusedLossGPTModel``): positional arguments up to
  ``rotary_pos_sin``, the keyword arguments in ``POSTPROCESS_KWARGS``, and ``GPTModel.forward`` calling it
  by keyword; ``mtp_block_inputs`` builds the MTP block call as ``_postprocess`` does (0.19 added
  ``padding_mask``, ``output_processor``, ``output_processor_context``).
* ``roll_tensor`` / ``MTPLossAutoScaler`` (module internals of ``multi_token_prediction``): ``mtp_roll_left``
  (returns the rolled tensor and the token count of the rolled mask) and ``attach_mtp_loss``. Unchanged
  0.16 -> 0.19.
* the MTP loss arithmetic the fused loss reproduces: 0.19 moved it to ``process_mtp_loss`` and changed it --
  with ``calculate_per_token_loss`` each depth's loss is multiplied by (tokens before the roll / tokens
  after it), token counts are clamped to >= 1 and the logged mean is 0 without tokens; ``mtp_detach_heads``
  is new. ``normalize_mtp_loss``, ``mtp_loss_for_log``, ``mtp_heads_detached``.
* the class-global MTP loss tracker (``MTPLossLoggingHelper.tracker``): 0.16 stores per-depth losses
  under ``"values"`` via ``save_loss_to_tracker``; 0.19 under ``"loss_values"`` (plus acceptance counts)
  via ``save_metrics_to_tracker``. ``record_mtp_loss``, ``take_mtp_losses``, ``clear_mtp_tracker``.
* ``no_rope_freq`` for MTP (``TriTransformerConfig.__post_init__``): megatron expands an int to a list of
  ``num_layers`` entries. Up to 0.18 the MTP block's transformer layers are numbered after the decoder's
  (``num_layers + d``) and index that list past its end; 0.19 numbers them ``d`` (1, 2, ...), so they read
  the first decoder layers' entries. ``extend_no_rope_freq_for_mtp`` appends RoPE entries (used up to
  0.18, unused on 0.19); ``mtp_transformer_layer_number`` says which number a release gives.
* gradient-accumulation fusion (``model/config.py``): ``tensor_parallel.layers._grad_accum_fusion_available``,
  the module flag ``ColumnParallelLinear`` checks at construction; ``wgrad_fusion_available``.
* RoPE interception (``model/attention.py``'s ``TriSelfAttention.forward``): ``TransformerLayer`` calls its
  self-attention with ``rotary_pos_emb=`` by keyword, ``Attention.forward`` rotates q and k only when it is
  not None, and calls the core attention as ``(q, k, v, mask, attn_mask_type=, attention_bias=,
  packed_seq_params=)``. ``divert_rotary_pos_emb`` takes the frequencies out of the keyword arguments,
  ``is_inference_call`` reads either KV-cache keyword (``inference_context``, ``inference_params``).
* the GPT layer spec's layout (``model/specs.py``): ``spec.submodules.self_attention.module`` and
  ``.submodules.core_attention``: ``set_attention_modules``.

Distributed data parallel and optimizer (``ops/fused_cross_entropy.py``, ``training/checkpointing.py``,
``training/fault.py``):

* DDP's gradient buffer attributes written on each parameter: ``main_grad`` (the buffer view),
  ``grad_added_to_main_grad`` (set by a layer that accumulated into it; DDP's backward hook then skips
  adding ``.grad``, unless ``zero_out_wgrad``), reset by ``zero_grad_buffer``. ``main_grad``,
  ``in_ddp_grad_buffer``, ``wgrad_placeholder``.
* ``DistributedOptimizer._set_main_param_and_optimizer_states(model_param, tensors)`` (private, wrapped
  per instance while loading without apex/TE) and ``init_state_fn(optimizer, config)``:
  ``torch_adam_step_passthrough``, ``prime_optimizer_state``.
* the global virtual-pipeline rank (``parallel_state.set_virtual_pipeline_model_parallel_rank``) set per
  model chunk around ``sharded_state_dict``, with the metadata's DP/CP group
  (``transformer.utils.ensure_metadata_has_dp_cp_group``): ``model_sharded_state_dicts``.
* an asynchronous sharded save (``dist_checkpointing.save(..., async_sharded_save=True)`` and its
  ``AsyncRequest``): 0.19 added ``async_strategy`` defaulting to nvidia-resiliency-ext's writer:
  ``async_sharded_save`` asks for megatron's own.
* the distributed checkpoint's common state: up to 0.18 ``common.pt`` (``CheckpointingConfig`` has
  ``common_backend``), 0.19 a ``ShardedObject`` in the checkpoint: ``common_state_in_common_pt``.

Host stand-ins (``compat/cpu.py``, ``dryrun/fake_world.py``, ``tools/bench_kernels.py``):

* ``tensor_parallel.random._set_cuda_rng_state`` / ``_get_cuda_rng_state`` (private module functions the
  RNG tracker calls) and its "CPU RNG state changed" warning: ``route_rng_tracker_to_host``.
* ``parallel_state.get_data_parallel_group_gloo`` / ``get_expert_data_parallel_group_gloo`` (read through the
  module by megatron's optimizer) answered with the main (non-gloo) groups on a fake world: ``gloo_groups_as_main``.
* ``vocab_parallel_cross_entropy`` on a given group: 0.16 reads the TP group/rank/size through getters
  bound in ``tensor_parallel.cross_entropy`` (rebound here); 0.19 takes ``tp_group=``:
  ``vocab_parallel_cross_entropy_on``. ``rope_utils._apply_rotary_pos_emb_bshd`` (private; 0.19 added
  ``mla_rotary_interleaved``): ``megatron_rope_bshd``.
* ``WrappedTorchNorm.__new__(cls, config, hidden_size, eps, ...)`` (the local spec's norm factory), replaced
  while the dry run builds its layers (``dryrun/stage.py``): ``torch_norms_built_by``.

Pinned only (the caller's owner is changing that file): ``datasets.helpers.build_exhaustive_blending_indices``
(``data/datasets.py``).

Imports of megatron-core happen inside the functions: ``compat`` calls this module before megatron builds
anything, and importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from typing import Iterator, Optional

import torch


def _version() -> str:
    import megatron.core

    return megatron.core.__version__


def _release() -> tuple:
    return tuple(int(p) for p in _version().split("+")[0].split(".")[:2])


class SeamError(RuntimeError):
    """The installed megatron-core does not match what a seam here relies on."""

    def __init__(self, seam: str, detail: str):
        super().__init__(f"megatron-core {_version()}: the seam '{seam}' in tri_megatron/mcore_internals.py no "
                         f"longer matches ({detail}); verified with megatron-core 0.16.1 and 0.19.0")


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


# ============================================================================ TransformerConfig details
def extend_no_rope_freq_for_mtp(config) -> None:
    """After ``TransformerConfig.__post_init__``: give the MTP layers RoPE entries in ``no_rope_freq``.

    megatron expands ``no_rope_freq`` to one entry per decoder layer (1 = skip RoPE); up to 0.18 the MTP
    block's layers are numbered ``num_layers + d`` and read past that list's end (an IndexError), so
    entries ``0`` (RoPE) are appended. On 0.19 they are numbered ``d`` and the appended entries are unused.
    """
    if isinstance(config.no_rope_freq, list) and config.mtp_num_layers:
        if len(config.no_rope_freq) == config.num_layers:
            config.no_rope_freq = config.no_rope_freq + [0] * config.mtp_num_layers


def mtp_transformer_layer_number(num_layers: int, depth: int) -> int:
    """The ``layer_number`` megatron gives the transformer layer of MTP depth ``depth`` (1-based) on one
    pipeline stage: ``num_layers + depth`` up to 0.18, ``depth`` on 0.19 (it indexes ``no_rope_freq`` and
    decides sliding-window attention)."""
    return depth if _release() >= (0, 19) else num_layers + depth


def wgrad_fusion_available() -> bool:
    """Whether megatron-core's own linear layers can fuse the weight-gradient accumulation.

    ``ColumnParallelLinear`` raises at construction when ``gradient_accumulation_fusion`` is set and apex's
    ``fused_weight_gradient_mlp_cuda`` did not import, recorded in the module flag
    ``tensor_parallel.layers._grad_accum_fusion_available`` (read at call time, so a test may patch it)."""
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))  # pinned by the tests


# ======================================================================= Attention.forward's RoPE input
ROPE_KWARG = "rotary_pos_emb"  # the keyword TransformerLayer passes the frequencies to its self-attention under


def divert_rotary_pos_emb(attention_kwargs: dict):
    """Takes the rotary frequencies out of ``SelfAttention.forward``'s keyword arguments: returns them
    (a tensor, a (q, k) tuple, or None) and leaves ``rotary_pos_emb=None``, with which megatron's
    ``Attention.forward`` rotates neither q nor k."""
    freqs = attention_kwargs.get(ROPE_KWARG)
    attention_kwargs[ROPE_KWARG] = None
    return freqs


def is_inference_call(attention_kwargs: dict) -> bool:
    """Whether ``SelfAttention.forward`` was called with a KV-cache context (either keyword, 0.16-0.19)."""
    return attention_kwargs.get("inference_context") is not None or \
        attention_kwargs.get("inference_params") is not None


# ============================================================== DDP's gradient buffer on each parameter
def main_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron DDP's gradient buffer view of ``param`` (``param.main_grad``; fp32 with
    ``grad_reduce_in_fp32``), None outside megatron's DDP."""
    return getattr(param, "main_grad", None)


def in_ddp_grad_buffer(param: torch.Tensor) -> bool:
    """Whether ``param`` is in a megatron DDP gradient buffer whose backward hook honours
    ``grad_added_to_main_grad`` (then a layer may accumulate its weight gradient straight into it)."""
    return main_grad(param) is not None and hasattr(param, "grad_added_to_main_grad")


def wgrad_placeholder(weight: torch.Tensor, storage: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """After the weight gradient was added into ``weight.main_grad``: what megatron's linear layers
    return as the weight's grad -- a weight-shaped tensor DDP's hook skips (``grad_added_to_main_grad`` set
    here), zeros when megatron set ``zero_out_wgrad`` (the hook adds those). Made in ``storage`` (a spent
    buffer of at least as many bytes) when given. None when ``weight`` is not in a DDP buffer."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    zero = getattr(weight, "zero_out_wgrad", False)
    if storage is not None and storage.is_contiguous() and \
            storage.numel() * storage.element_size() >= weight.numel() * weight.element_size():
        flat = storage.view(-1).view(torch.uint8)[: weight.numel() * weight.element_size()]
        dummy = flat.view(weight.dtype).view(weight.shape)
        if zero:
            dummy.zero_()
    else:
        make = torch.zeros if zero else torch.empty
        dummy = make(weight.main_grad.shape, dtype=weight.dtype, device=weight.device, requires_grad=False)
    weight.grad_added_to_main_grad = True
    return dummy


# ===================================================================== DistributedOptimizer state loading
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prime_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam its state (with 'step') before a load.

    Without apex/TE, megatron-core's DistributedOptimizer.state_dict() reads every param's 'step', which
    torch Adam only creates on its first step; megatron's ``init_state_fn(optimizer, config)`` does not add it.
    """
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(inner, getattr(opt, "config", None))
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def torch_adam_step_passthrough(optimizer) -> Iterator[None]:
    """Without apex/TE, DistributedOptimizer.load_state_dict sets torch Adam's 'step' from the checkpoint,
    then copies every per-param state tensor from the fully-reshardable payload, which has no 'step'
    (KeyError), through ``self._set_main_param_and_optimizer_states(model_param, tensors)``. Wrap that
    method on each instance to hand the copy the step just restored, so it copies it onto itself."""
    patched = []
    for opt in _optimizers(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, _opt=opt, _setter=setter):
            steps = [s["step"] for s in _opt.optimizer.state.values() if "step" in s]
            if steps and "step" not in tensors:
                tensors = {**tensors, "step": steps[0]}
            return _setter(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
            # megatron hands every param the same 'step' tensor, which torch Adam then increments
            # once per param: give each its own.
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


# ================================================================ sharded state dicts of the model chunks
def model_sharded_state_dicts(chunks: list) -> list:
    """``sharded_state_dict`` of each model chunk (unwrapped GPTModels) as megatron's own checkpointing
    builds them: the metadata carries the DP/CP group (MTP off the first stage needs it) and, with
    several chunks (virtual pipeline), the global virtual-pipeline rank is set to the chunk's index
    while its dict is built (then put back)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(None)
    if len(chunks) == 1:
        return [chunks[0].sharded_state_dict(metadata=metadata)]
    before = parallel_state.get_virtual_pipeline_model_parallel_rank()
    out = []
    try:
        for i, chunk in enumerate(chunks):
            parallel_state.set_virtual_pipeline_model_parallel_rank(i)
            out.append(chunk.sharded_state_dict(metadata=metadata))
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_rank(before)
    return out


def async_sharded_save(state: dict, checkpoint_dir: str):
    """``dist_checkpointing.save(state, dir, async_sharded_save=True)``: megatron's ``AsyncRequest`` (a
    NamedTuple: ``async_fn`` writes this rank's shards; ``add_finalize_fn``, ``execute_sync``; scheduled by
    ``AsyncCallsQueue(persistent=).schedule_async_request``). 0.19 added ``async_strategy``, default
    ``"nvrx"``, which needs nvidia-resiliency-ext (not one of our dependencies): ask for megatron's own
    writer (``"mcore"``), the one 0.16 always uses."""
    from megatron.core import dist_checkpointing

    kwargs = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(state, checkpoint_dir, async_sharded_save=True, **kwargs)


def common_state_in_common_pt() -> bool:
    """Whether megatron's distributed checkpoint keeps the common state in ``common.pt`` (up to 0.18,
    recorded as ``common_backend`` in ``metadata.json``) rather than as a ``ShardedObject`` (0.19)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return "common_backend" in {f.name for f in dataclasses.fields(CheckpointingConfig)}


# =========================================================================================== host stand-ins
RNG_TRACKER_HOOKS = ("_set_cuda_rng_state", "_get_cuda_rng_state")
_HOST_RNG_WARNING = "CPU RNG state changed"


def route_rng_tracker_to_host() -> None:
    """megatron's CUDA RNG tracker reads and writes the generator through the private module functions
    ``tensor_parallel.random._set_cuda_rng_state`` / ``_get_cuda_rng_state``: point them at the host
    generator (which stands in for the device's), and silence the tracker's warning that the host state
    changed (its fork swaps it on purpose here)."""
    from megatron.core.tensor_parallel import random as mpu_random

    missing = [n for n in RNG_TRACKER_HOOKS if not hasattr(mpu_random, n)]
    if missing:
        raise SeamError("RNG tracker on the host", f"megatron.core.tensor_parallel.random has no {missing}")
    mpu_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    logging.getLogger(mpu_random.__name__).addFilter(lambda record: _HOST_RNG_WARNING not in record.getMessage())


@contextlib.contextmanager
def gloo_groups_as_main() -> Iterator[None]:
    """megatron's gloo groups (used only to save / load distributed-optimizer state) answered with the
    corresponding main groups, for a fake world where gloo cannot run (call after
    ``initialize_model_parallel(..., create_gloo_process_groups=False)``). megatron's optimizer reads them
    through the ``parallel_state`` module, so rebinding the module's getters reaches it."""
    from megatron.core import parallel_state as ps

    saved = (ps.get_data_parallel_group_gloo, ps.get_expert_data_parallel_group_gloo)
    ps.get_data_parallel_group_gloo = lambda with_context_parallel=False, partial_data_parallel=False: \
        ps.get_data_parallel_group(with_context_parallel=with_context_parallel,
                                   partial_data_parallel=partial_data_parallel)
    ps.get_expert_data_parallel_group_gloo = lambda partial_expert_data_parallel=False: \
        ps.get_expert_data_parallel_group(partial_expert_data_parallel=partial_expert_data_parallel)
    try:
        yield
    finally:
        ps.get_data_parallel_group_gloo, ps.get_expert_data_parallel_group_gloo = saved


def vocab_parallel_cross_entropy_on(group):
    """megatron's ``vocab_parallel_cross_entropy(logits, target)`` on the tensor-parallel group ``group``
    without megatron's parallel state: 0.19 takes ``tp_group=``; 0.16 reads the group, rank and size
    through getters bound in ``tensor_parallel.cross_entropy``, rebound here (for the process)."""
    from megatron.core.tensor_parallel import cross_entropy as mce

    if "tp_group" in inspect.signature(mce.vocab_parallel_cross_entropy).parameters:
        return functools.partial(mce.vocab_parallel_cross_entropy, tp_group=group)
    getters = ("get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
               "get_tensor_model_parallel_world_size")
    missing = [g for g in getters if not hasattr(mce, g)]
    if missing:
        raise SeamError("vocab_parallel_cross_entropy on a group", f"neither tp_group= nor the getters {missing}")
    mce.get_tensor_model_parallel_group = lambda: group
    mce.get_tensor_model_parallel_rank = lambda: group.rank()
    mce.get_tensor_model_parallel_world_size = lambda: group.size()
    return mce.vocab_parallel_cross_entropy


def megatron_rope_bshd():
    """megatron's unfused RoPE on one [s, b, h, d] tensor, ``f(t, freqs)`` (the private
    ``rope_utils._apply_rotary_pos_emb_bshd``; 0.19 added ``mla_rotary_interleaved``)."""
    from megatron.core.models.common.embeddings import rope_utils

    fn = getattr(rope_utils, "_apply_rotary_pos_emb_bshd", None)
    if fn is None:
        raise SeamError("megatron RoPE (bshd)", "rope_utils._apply_rotary_pos_emb_bshd is gone")
    return fn


@contextlib.contextmanager
def torch_norms_built_by(build) -> Iterator[None]:
    """While open, megatron's norm factory ``WrappedTorchNorm(config, hidden_size, eps, ...)`` (a class whose
    ``__new__`` returns a torch norm) returns ``build(config, hidden_size, eps, megatron_norm)``, where
    ``megatron_norm(config)`` builds megatron's own norm for that config and the same other arguments."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    orig = WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        return build(config, hidden_size, eps, lambda cfg: orig(cls, cfg, hidden_size, eps, *args, **kwargs))

    WrappedTorchNorm.__new__ = new
    try:
        yield
    finally:
        WrappedTorchNorm.__new__ = orig


# ================================================================================ GPT layer spec layout
def set_attention_modules(layer_spec, self_attention=None, core_attention=None):
    """Deep copy of megatron's GPT decoder layer spec with its self-attention module and/or core attention
    replaced (``spec.submodules.self_attention.module`` / ``.submodules.core_attention``)."""
    import copy

    spec = copy.deepcopy(layer_spec)
    if self_attention is not None:
        spec.submodules.self_attention.module = self_attention
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec
