"""Model construction: TransformerConfig details (no_rope_freq for MTP, the wgrad-fusion flag), the RoPE keyword
of SelfAttention, DDP's main_grad contract, the GPT layer / block / MTP specs' attention and norm slots, and
the context-parallel split of the model's input batch.

Part of the megatron-core seam (``tri_megatron.mcore_internals``: see its docstring for every seam).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from tri_megatron.mcore_internals.release import _release


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
    here), zeros when megatron set ``zero_out_wgrad`` (the hook adds those). Made in ``storage`` when given:
    a spent buffer of at least as many bytes, or ``weight.main_grad`` itself (the hook neither reads nor
    writes a placeholder it skips, so it costs no memory; never when zeros are wanted). None when
    ``weight`` is not in a DDP buffer."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    zero = getattr(weight, "zero_out_wgrad", False)
    if zero and storage is not None and storage is main_grad(weight):
        storage = None
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


def set_norm_modules(layer_spec, norm):
    """Deep copy of megatron's GPT decoder layer spec with both norms (``spec.submodules.input_layernorm``,
    ``.pre_mlp_layernorm``) built by ``norm`` (called as megatron calls norms: config, hidden_size, eps)."""
    import copy

    spec = copy.deepcopy(layer_spec)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    return spec


def set_mtp_norm_modules(mtp_block_spec, norm):
    """Deep copy of megatron's MTP block spec (``layer_specs`` of MTP layers) with each layer's three norms
    (``submodules.enorm``, ``.hnorm``, ``.layer_norm``) built by ``norm``."""
    import copy

    spec = copy.deepcopy(mtp_block_spec)
    for layer in spec.layer_specs:
        layer.submodules.enorm = norm
        layer.submodules.hnorm = norm
        layer.submodules.layer_norm = norm
    return spec


def decoder_block_spec(config, layer_spec, final_norm, vp_stage=None):
    """The decoder block spec megatron derives from a single layer spec (``TransformerBlock`` given a
    layer ``ModuleSpec``: that layer on each of ``get_num_layers_to_build(config, vp_stage)`` layers),
    with its final norm built by ``final_norm`` instead of megatron's module-level choice (TE's norm when
    TE imports, else apex's or the torch norm)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=final_norm)


# ====================================================================== context-parallel batch split
def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """This context-parallel rank's part of a micro-batch: megatron's load-balanced split of every tensor
    along the sequence (of 2*CP chunks, rank r keeps chunks r and 2*CP-1-r), by
    ``megatron.core.utils.get_batch_on_this_cp_rank``. Up to 0.18 it takes ``(batch, cp_group=None)``,
    None meaning parallel_state's CP group; 0.19 added a required ``is_hybrid_cp`` (False: the same
    per-sequence split for batches without ``cu_seqlens``, which is all ours: packed sequences refuse
    CP) and reads the size and rank from ``cp_group`` alone, where None means the whole world. So the
    group is always passed."""
    split, extra = _cp_split()
    return split(batch, cp_group=cp_group, **extra)


@functools.lru_cache(maxsize=None)
def _cp_split():
    """megatron's CP split and the extra keyword arguments this release needs (asked once, not per batch)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    takes_hybrid = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
    return get_batch_on_this_cp_rank, ({"is_hybrid_cp": False} if takes_hybrid else {})
