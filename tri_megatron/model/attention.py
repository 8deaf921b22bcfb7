"""Attention modules for the Tri layer specs.

``TriSelfAttention`` is megatron-core's ``SelfAttention`` except that, where the fused RoPE path is
on, it hands the rotary frequencies to its core attention instead of rotating q and k itself. The core
attention then applies RoPE and the Tri query scaling (SSMax or temperature tuning) to q and k in one
pass (``tri_megatron.ops.apply_rope_and_query_scale``: CUDA kernel on GPU, PyTorch reference
elsewhere) before the attention kernel.

``SDPACoreAttention`` replaces megatron-core's unfused local ``DotProductAttention`` when
Transformer Engine is absent: it calls ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU, GQA without materialising repeated K/V) and honours megatron's
sliding-window settings. ``te_core_attention_with_query_scaling`` wraps TE's ``TEDotProductAttention``
the same way.

The fused path is on when query scaling is enabled, and for plain RoPE when the CUDA kernel is built
and TE (whose own fused RoPE megatron uses) is not.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint

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
    return torch.cuda.is_available() and not config.apply_rope_fusion and kernels_available()


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
        if getattr(core, "fuse_rope", False) and kwargs.get("inference_context") is None \
                and kwargs.get("inference_params") is None:
            no_rope = self.config.no_rope_freq[self.layer_number - 1] if self.config.no_rope_freq else False
            core.pending_freqs = None if no_rope else kwargs.get("rotary_pos_emb")
            kwargs["rotary_pos_emb"] = None
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


class SDPACoreAttention(FusedRopeMixin, MegatronModule):
    """Causal (optionally sliding-window) attention through torch SDPA, megatron's core-attention API."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention (--transformer-impl transformer_engine)")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
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

    def _window_mask(self, sq: int, sk: int, device) -> torch.Tensor:
        i = torch.arange(sq, device=device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=device)[None, :]
        return (j <= i + self.window[1]) & (j >= i - self.window[0])  # True = attend

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need Transformer Engine's attention")
        query, key = self._rope_and_scale(query, key, packed_seq_params)
        sq, b, _, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout = self.dropout_p if self.training else 0.0
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=True)
        else:
            mask = self._window_mask(sq, k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=True)
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
