"""Core attention modules for the Tri layer specs.

``SDPACoreAttention`` replaces megatron-core's unfused local ``DotProductAttention`` when
Transformer Engine is absent: it calls ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU, GQA without materialising repeated K/V), honours megatron's sliding
window settings, and applies the Tri query scaling (SSMax or temperature tuning) to q first.
``te_core_attention_with_query_scaling`` wraps TE's ``TEDotProductAttention`` the same way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint

from tri_megatron.model.query_scaling import QueryScaling


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


def _query_scaling_sharded_state_dict(query_scaling, prefix, sharded_offsets):
    """Sharded entries for ``prefix + 'query_scaling.*'``: SSMax's s is split across TP like the heads."""
    if query_scaling is None:
        return {}
    state_dict = {f"query_scaling.{k}": v for k, v in query_scaling.state_dict(keep_vars=True).items()}
    return make_sharded_tensors_for_checkpoint(
        state_dict, prefix, {"query_scaling.ssmax_scale": 0}, sharded_offsets
    )


class SDPACoreAttention(MegatronModule):
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
        self.query_scaling = build_query_scaling(config, self.layer_number, self.num_heads)

    def _window_mask(self, sq: int, sk: int, device) -> torch.Tensor:
        i = torch.arange(sq, device=device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=device)[None, :]
        return (j <= i + self.window[1]) & (j >= i - self.window[0])  # True = attend

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need Transformer Engine's attention")
        if self.query_scaling is not None:
            query = self.query_scaling(query)
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

    class TEQueryScaledAttention(TEDotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
            super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self.query_scaling = build_query_scaling(config, layer_number, config.num_attention_heads // tp)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if self.query_scaling is not None:
                cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
                query = self.query_scaling(query, cu)
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            sd.update(_query_scaling_sharded_state_dict(self.query_scaling, prefix, sharded_offsets))
            return sd

    return TEQueryScaledAttention
