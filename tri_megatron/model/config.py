"""megatron-core ``TransformerConfig`` for the Tri model, built from parsed flags.

``TriTransformerConfig`` adds the Tri query-scaling fields to megatron-core's config; everything
else (RMSNorm, SwiGLU, GQA, RoPE, MTP, iRoPE through ``no_rope_freq``, sliding windows through
``window_size`` / ``window_attn_skip_freq``, recomputation, FP8) is megatron-core's own.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from tri_megatron.mcore_internals import extend_no_rope_freq_for_mtp, wgrad_fusion_available
from tri_megatron.model.query_scaling import default_ssmax_init


@dataclasses.dataclass
class TriTransformerConfig(TransformerConfig):
    ssmax: bool = False
    """Scalable-Softmax: q scaled by s_h*log(n) on every layer (learnable s per layer and head)."""

    ssmax_init: float = 1.0
    """Initial value of SSMax's s."""

    attn_temperature_tuning: bool = False
    """Llama-4 / Tri-70B query temperature tuning on NoPE layers."""

    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        extend_no_rope_freq_for_mtp(self)  # MTP layers use RoPE (the seam in mcore_internals)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary padded to a multiple of 128, independent of the layout so that checkpoints reshard.

    Raises ValueError when the padded size does not split evenly over the tensor-parallel ranks.
    """
    padded = -(-vocab_size // 128) * 128
    if padded % tp:
        raise ValueError(
            f"vocabulary {vocab_size} (padded to {padded}) does not split over --tensor-model-parallel-size {tp}; "
            f"use a TP size dividing {padded}"
        )
    return padded


def transformer_config_from_args(args, use_te: bool, rt=None) -> TriTransformerConfig:
    """The model config for args on runtime rt (default: the active one, tri_megatron.runtime)."""
    from tri_megatron import runtime

    rt = rt or runtime.current()
    cuda = rt.cuda_kernels  # real CUDA: fused kernels exist
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        # parallelism
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        pipeline_dtype=dtype,
        batch_p2p_comm=rt.batch_p2p_comm,  # NCCL only (see Runtime.batch_p2p_comm)
        params_dtype=dtype,
        bf16=args.bf16,
        autocast_dtype=dtype,
        calculate_per_token_loss=args.calculate_per_token_loss,
        # On an accelerator the weights are created and initialised there (each TP rank draws its own
        # shard from megatron's model-parallel RNG); on CPU megatron's CPU path draws the full weight
        # then splits it. Parity across layouts is tested from one initial checkpoint either way.
        use_cpu_initialization=not rt.on_accelerator,
        perform_initialization=True,
        # fusions: only where their kernels exist
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=use_te,
        # TE's linears fuse the wgrad accumulation themselves, but the output layer (and every linear
        # of the local spec) is megatron's, which needs apex's fused_weight_gradient_mlp_cuda.
        gradient_accumulation_fusion=use_te and cuda and wgrad_fusion_available(),
        cross_entropy_loss_fusion=False,
        # MTP / iRoPE / sliding windows, all megatron-core's
        mtp_num_layers=args.mtp_num_layers or None,
        mtp_loss_scaling_factor=args.mtp_loss_scaling_factor,
        no_rope_freq=args.no_rope_freq,
        window_size=(args.window_size - 1, 0) if args.window_size else None,
        window_attn_skip_freq=args.window_attn_skip_freq,
        # recomputation
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
        # Tri query scaling
        ssmax=args.ssmax,
        ssmax_init=default_ssmax_init(args.seq_length),
        attn_temperature_tuning=bool(args.attn_temperature_tuning),
        attn_floor_scale=args.attn_floor_scale,
        attn_scale=args.attn_scale,
    )
    if args.fp8_format:
        kwargs.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    return TriTransformerConfig(**kwargs)
