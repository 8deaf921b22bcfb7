"""Attention modules for the Tri layer specs.

``TriSelfAttention`` is megatron-core's ``SelfAttention`` except that, where the fused RoPE path is
on, it hands the rotary frequencies to its core attention instead of rotating q and k itself. The core
attention then applies RoPE and the Tri query scaling (SSMax or temperature tuning) to q and k in one
pass (``tri_megatron.ops.apply_rope_and_query_scale``: CUDA kernel on GPU, PyTorch reference
elsewhere) before the attention kernel.

``SDPACoreAttention`` replaces megatron-core's unfused local ``DotProductAttention`` when
Transformer Engine is absent: it calls ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU, GQA without materialising repeated K/V) and honours megatron's
sliding-window settings. Packed sequences (megatron-core's ``PackedSeqParams``, qkv_format "thd": q
[t, h, d] with cu_seqlens) and sliding windows (as one document per sample) are attended block by
block (``blocked_varlen_attention``): each block of queries meets only the keys of its own document
within reach (``max_seqlen - 1`` or the window back), with a mask of [block, block + reach] -- never a
dense [s, s] mask, whose O(s^2) memory (and the math backend it forces) was the cost at Tri-70B's 4,096
window -- and with gradients on each block is checkpointed, so the masks are never all held at once.
No device sync: ``max_seqlen`` is a host int. Under context
parallelism (CP > 1) each rank all-gathers K and V over the CP group (megatron's "all_gather" CP
scheme; the backward reduce-scatters their gradients) and attends its two load-balanced sequence
chunks (chunks r and 2*CP-1-r, as ``get_batch_on_this_cp_rank`` cut them) at their true positions
(there, a window keeps the older per-block masks without checkpointing; packed sequences are not
supported under CP). ``te_core_attention_with_query_scaling`` wraps TE's ``TEDotProductAttention``
the same way.

The fused path is on when query scaling is enabled, and for plain RoPE when the CUDA kernel is built
and TE (whose own fused RoPE megatron uses) is not.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint

from tri_megatron.mcore_internals import divert_rotary_pos_emb, is_inference_call
from tri_megatron.model.query_scaling import QueryScaling
from tri_megatron.ops import apply_rope_and_query_scale, kernels_available


def _is_nope_layer(config, layer_number: int) -> bool:
    nrf = config.no_rope_freq
    return bool(nrf[layer_number - 1]) if nrf else False


def build_query_scaling(config, layer_number: int, num_heads_local: int) -> Optional[QueryScaling]:
    """The layer's QueryScaling, or None: SSMax on every layer, temperature tuning on NoPE layers."""
    if getattr(config, "ssmax", False):
        return QueryScaling("ssmax", num_heads_local, ssmax_init=config.ssmax_init)
    if getattr(config, "attn_temperature_tuning", False) and _is_nope_layer(config, layer_number):
        return QueryScaling("temperature", num_heads_local, floor_scale=config.attn_floor_scale,
                            attn_scale=config.attn_scale)
    return None


def fuse_rope_in_core_attention(config, query_scaling) -> bool:
    if config.context_parallel_size > 1:
        return False  # megatron's RoPE handles the CP sequence split
    if query_scaling is not None:
        return True
    from tri_megatron import runtime

    return runtime.current().cuda_kernels and not config.apply_rope_fusion and kernels_available()


class FusedRopeMixin:
    """Core-attention side of the fused path: RoPE + query scale on q, k before attending."""

    pending_freqs = None  # set by TriSelfAttention each forward (None: NoPE layer or nothing to do)

    def _init_fused_rope(self, config, layer_number: int, num_heads_local: int) -> None:
        self.query_scaling = build_query_scaling(config, layer_number, num_heads_local)
        self.fuse_rope = fuse_rope_in_core_attention(config, self.query_scaling)

    def _rope_and_scale(self, query, key, packed_seq_params):
        if not self.fuse_rope:
            return query, key
        freqs = self.pending_freqs
        if isinstance(freqs, tuple):
            freqs = freqs[0]
        if freqs is None and self.query_scaling is None:
            return query, key
        cu = None
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        scaling = self.query_scaling.op_kwargs() if self.query_scaling is not None else {"mode": "none"}
        return apply_rope_and_query_scale(query, key, freqs, apply_rope=freqs is not None, cu_seqlens=cu, **scaling)


class TriSelfAttention(SelfAttention):
    """megatron-core SelfAttention that leaves RoPE to a fused-RoPE core attention (training path)."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        core = self.core_attention
        if getattr(core, "fuse_rope", False) and not is_inference_call(kwargs):
            no_rope = self.config.no_rope_freq[self.layer_number - 1] if self.config.no_rope_freq else False
            freqs = divert_rotary_pos_emb(kwargs)  # megatron then rotates neither q nor k (the seam)
            core.pending_freqs = None if no_rope else freqs
        elif getattr(core, "fuse_rope", False):
            raise NotImplementedError("the fused RoPE / query-scaling path is for training; use the HF export for inference")
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def _query_scaling_sharded_state_dict(query_scaling, prefix, sharded_offsets):
    """Sharded entries for ``prefix + 'query_scaling.*'``: SSMax's s is split across TP like the heads."""
    if query_scaling is None:
        return {}
    state_dict = {f"query_scaling.{k}": v for k, v in query_scaling.state_dict(keep_vars=True).items()}
    return make_sharded_tensors_for_checkpoint(
        state_dict, prefix, {"query_scaling.ssmax_scale": 0}, sharded_offsets
    )


def _varlen_block(qb, kb, vb, qdoc, kdoc, q0: int, k0: int, left, right: int, scale, dropout_p: float):
    """One query block against its key span; the mask is built here so that, under checkpointing, it is
    never kept for the backward pass."""
    qpos = torch.arange(q0, q0 + qb.shape[2], device=qb.device)[:, None]
    kpos = torch.arange(k0, k0 + kb.shape[2], device=qb.device)[None, :]
    allowed = (kdoc[None, :] == qdoc[:, None]) & (kpos <= qpos + right)
    if left is not None:
        allowed = allowed & (kpos >= qpos - left)
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=True)


def blocked_varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, window=None, block: int = 512,
                             scale: Optional[float] = None, dropout_p: float = 0.0):
    """Causal attention of packed documents, q [t, h, d], k, v [t, g, d] (GQA), cu_seqlens [n+1]: token i
    attends keys j <= i of its own document (and, with ``window = (left, right)``, i - left <= j <= i +
    right). Queries go in blocks of ``block``; a block meets only the keys its documents can reach (at
    most ``max_seqlen - 1``, or ``left``, before it) through one SDPA call with a [block, block + reach]
    mask -- never a [t, t] one. With gradients on, each block is checkpointed (its mask and SDPA's saved
    state are rebuilt in the backward), so the masks' O(t * reach) memory is never held at once.
    Returns [t, h, d]. No device sync: ``max_seqlen`` is a host int."""
    t = q.shape[0]
    tok = torch.arange(t, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(device=q.device, dtype=torch.long), tok, right=True)
    left, right = window if window is not None else (None, 0)
    reach = max(int(max_seqlen) - 1, 0)  # no key further back than the longest document allows
    if left is not None:
        reach = min(reach, left)
    qh, kh, vh = q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None]
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for b0 in range(0, t, block):
        b1 = min(t, b0 + block)
        k0, k1 = max(0, b0 - reach), min(t, b1 + right)
        args = (qh[:, :, b0:b1], kh[:, :, k0:k1], vh[:, :, k0:k1], doc[b0:b1], doc[k0:k1], b0, k0, left, right,
                scale, dropout_p)
        if recompute:
            # (no metadata check: the virtual accelerator of the tests reports SDPA's saved tensors on the host
            # in the forward and on its "cuda" in the recomputation; values are the same)
            outs.append(torch.utils.checkpoint.checkpoint(_varlen_block, *args, use_reentrant=False,
                                                          determinism_check="none"))
        else:
            outs.append(_varlen_block(*args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out[0].permute(1, 0, 2)


class SDPACoreAttention(FusedRopeMixin, MegatronModule):
    """Causal (optionally sliding-window, optionally context-parallel) attention through torch SDPA,
    megatron's core-attention API."""

    # queries per block of the sliding-window path: the largest mask is [block, block + window - 1]
    window_block = 512

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            self.cp_group = self.cp_group or parallel_state.get_context_parallel_group()
        self.layer_number = max(1, layer_number)
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Sliding window: megatron's window_size=(left, right) keys beside the query.
        self.window = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            self.window = config.window_size
        self._init_fused_rope(config, self.layer_number, self.num_heads)

    def _sdpa(self, q, k, v, **kw):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                                              scale=self.softmax_scale, enable_gqa=True, **kw)

    def _span(self, q, k, v, q_start: int, k_start: int):
        """q ([b, h, sq, d]) at positions q_start.. against k, v at positions k_start.., causal + window."""
        qpos = torch.arange(q_start, q_start + q.shape[2], device=q.device)[:, None]
        kpos = torch.arange(k_start, k_start + k.shape[2], device=q.device)[None, :]
        left, right = self.window if self.window is not None else (None, 0)
        allowed = kpos <= qpos + right
        if left is not None:
            allowed = allowed & (kpos >= qpos - left)
        return self._sdpa(q, k, v, attn_mask=allowed)

    def _attend(self, q, k, v, q_start: int):
        """q [b, h, sq, d] at positions q_start..q_start+sq-1; k, v [b, g, sk, d] at positions 0..sk-1."""
        sq, sk = q.shape[2], k.shape[2]
        window = self.window
        if window is not None and window[0] >= sk - 1 and window[1] == 0:
            window = None  # the window reaches the whole sequence
        if window is None:
            if q_start == 0 and sq == sk:
                return self._sdpa(q, k, v, is_causal=True)
            end = q_start + sq
            return self._span(q, k[:, :, :end], v[:, :, :end], q_start, 0)
        left, right = window
        outs = []
        for b0 in range(0, sq, self.window_block):
            qb = q[:, :, b0:b0 + self.window_block]
            p0 = q_start + b0
            k0, k1 = max(0, p0 - left), min(sk, p0 + qb.shape[2] + right)
            outs.append(self._span(qb, k[:, :, k0:k1], v[:, :, k0:k1], p0, k0))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_packed(self, q, k, v, cu_seqlens, max_seqlen: int):
        """thd: q [t, h, d], k, v [t, g, d]; token i attends j <= i of its own document (and window)."""
        return blocked_varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=self.window, block=self.window_block,
                                        scale=self.softmax_scale, dropout_p=self.dropout_p if self.training else 0.0)

    def _gather_cp(self, x):
        """[2L, b, g, d] (this rank's chunks r, 2cp-1-r) -> the whole sequence [2L*cp, b, g, d] in order."""
        cp = self.cp_group.size()
        full = gather_from_sequence_parallel_region(x, True, group=self.cp_group)  # rank-major
        halves = full.view(cp, 2, x.shape[0] // 2, *x.shape[1:])
        order = [halves[r, 0] for r in range(cp)] + [halves[r, 1] for r in reversed(range(cp))]
        return torch.cat(order, dim=0)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        query, key = self._rope_and_scale(query, key, packed_seq_params)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd" or self.cp_group is not None:
                raise NotImplementedError("the local attention takes packed sequences as thd, without context "
                                          "parallelism")
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            out = self._attend_packed(query, key, value, cu, packed_seq_params.max_seqlen_q)
            return out.reshape(out.shape[0], self.num_heads * out.shape[-1])
        sq, b = query.shape[:2]
        whole = self.window is not None and self.window[0] >= sq - 1 and self.window[1] == 0
        if self.cp_group is None and self.window is not None and not whole:
            # sliding window: the packed mechanism with one document per sample ([s, b] -> [b*s] tokens)
            thd = [x.transpose(0, 1).reshape(b * sq, *x.shape[2:]) for x in (query, key, value)]
            cu = torch.arange(0, b * sq + 1, sq, device=query.device, dtype=torch.int32)
            out = self._attend_packed(*thd, cu, sq)
            return out.reshape(b, sq, self.num_heads * out.shape[-1]).transpose(0, 1).contiguous()
        sq, b, _, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        if self.cp_group is None:
            k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
            out = self._attend(q, k, v, k.shape[2] - sq)
        else:
            cp, r, half = self.cp_group.size(), self.cp_group.rank(), sq // 2
            k = self._gather_cp(key).permute(1, 2, 0, 3)
            v = self._gather_cp(value).permute(1, 2, 0, 3)
            out = torch.cat([self._attend(q[:, :, :half], k, v, r * half),
                             self._attend(q[:, :, half:], k, v, (2 * cp - 1 - r) * half)], dim=2)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * d)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _query_scaling_sharded_state_dict(self.query_scaling, prefix, sharded_offsets)


def te_core_attention_with_query_scaling():
    """TEDotProductAttention subclass that scales q first (built only when TE imports)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEQueryScaledAttention(FusedRopeMixin, TEDotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
            super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self._init_fused_rope(config, layer_number, config.num_attention_heads // tp)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            query, key = self._rope_and_scale(query, key, packed_seq_params)
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            sd.update(_query_scaling_sharded_state_dict(self.query_scaling, prefix, sharded_offsets))
            return sd

    return TEQueryScaledAttention
