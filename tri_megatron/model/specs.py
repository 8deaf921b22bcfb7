"""Layer specs for the Tri model on megatron-core.

The Transformer Engine spec when TE imports (fused layer-norm + linear, TE flash attention, FP8),
megatron-core's local spec otherwise, with torch SDPA as core attention instead of megatron's
unfused one. Either way the core attention applies the Tri query scaling when it is enabled.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)

from tri_megatron.mcore_internals import set_attention_modules
from tri_megatron.model.attention import SDPACoreAttention, TriSelfAttention, te_core_attention_with_query_scaling


def tri_layer_spec(config, use_te: bool):
    """Decoder layer spec: RMSNorm, GQA self-attention with RoPE, SwiGLU MLP, no biases."""
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
        if getattr(config, "ssmax", False) or getattr(config, "attn_temperature_tuning", False):
            spec = set_attention_modules(spec, TriSelfAttention, te_core_attention_with_query_scaling())
        return spec
    return set_attention_modules(get_gpt_layer_local_spec(normalization="RMSNorm"), TriSelfAttention,
                                 SDPACoreAttention)


def tri_mtp_block_spec(config, layer_spec, use_te: bool, vp_stage=None):
    """MTP block spec (megatron-core's MTP layers around our decoder layer); None without MTP."""
    if not config.mtp_num_layers:
        return None
    return get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te, vp_stage=vp_stage)
