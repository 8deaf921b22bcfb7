"""Layer specs for the Tri model on megatron-core.

The Transformer Engine spec when TE imports (fused layer-norm + linear, TE flash attention, FP8),
megatron-core's local spec otherwise, with torch SDPA as core attention instead of megatron's
unfused one and our RMSNorm (``model/norm.py``, which accepts sequence parallelism) in every norm slot:
the layers', the decoder's final norm and the MTP layers'. Either way the core attention applies the
Tri query scaling when it is enabled.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)

from tri_megatron.mcore_internals import (
    decoder_block_spec,
    set_attention_modules,
    set_mtp_norm_modules,
    set_norm_modules,
)
from tri_megatron.model.attention import SDPACoreAttention, TriSelfAttention, te_core_attention_with_query_scaling
from tri_megatron.model.norm import TriRMSNorm

# The norm of the local spec; the dry run swaps in one that records what Transformer Engine's would save.
LOCAL_NORM = TriRMSNorm


def tri_layer_spec(config, use_te: bool):
    """Decoder layer spec: RMSNorm, GQA self-attention with RoPE, SwiGLU MLP, no biases."""
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
        if getattr(config, "ssmax", False) or getattr(config, "attn_temperature_tuning", False):
            spec = set_attention_modules(spec, TriSelfAttention, te_core_attention_with_query_scaling())
        return spec
    spec = set_norm_modules(get_gpt_layer_local_spec(normalization="RMSNorm"), LOCAL_NORM)
    return set_attention_modules(spec, TriSelfAttention, SDPACoreAttention)


def tri_decoder_spec(config, layer_spec, use_te: bool, vp_stage=None):
    """What ``GPTModel`` builds its decoder from: with TE the layer spec (megatron adds TE's final norm);
    in the local spec the block of those layers with our final norm."""
    if use_te:
        return layer_spec
    return decoder_block_spec(config, layer_spec, LOCAL_NORM, vp_stage=vp_stage)


def tri_mtp_block_spec(config, layer_spec, use_te: bool, vp_stage=None):
    """MTP block spec (megatron-core's MTP layers around our decoder layer); None without MTP."""
    if not config.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te, vp_stage=vp_stage)
    return spec if use_te else set_mtp_norm_modules(spec, LOCAL_NORM)
