"""megatron-core ``TransformerConfig`` for the Tri model, built from the typed run configuration.

``TriTransformerConfig`` adds the Tri query-scaling fields to megatron-core's config; everything
else (RMSNorm, SwiGLU, GQA, RoPE, MTP, iRoPE through ``no_rope_freq``, sliding windows through
``window_size`` / ``window_attn_skip_freq``, recomputation, FP8) is megatron-core's own.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
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


def transformer_config(cfg, use_te: bool, rt=None) -> TriTransformerConfig:
    """megatron-core's model config for a run (``cfg``: RunConfig) on runtime rt (default: the active
    one, tri_megatron.runtime): the architecture's part (``ModelArch.transformer_config_kwargs``) plus the
    layout, precision, recomputation and the fusions this runtime has kernels for."""
    from tri_megatron import runtime

    rt = rt or runtime.current()
    cuda = rt.cuda_kernels  # real CUDA: fused kernels exist
    par, tr = cfg.parallel, cfg.training
    dtype = torch.bfloat16 if tr.bf16 else torch.float32
    kwargs = dict(
        cfg.arch.transformer_config_kwargs(),
        activation_func=F.silu,
        mtp_loss_scaling_factor=tr.mtp_loss_scaling_factor,
        ssmax_init=default_ssmax_init(tr.seq_length),
        # parallelism
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        sequence_parallel=par.sequence_parallel,
        context_parallel_size=par.cp,
        pipeline_dtype=dtype,
        batch_p2p_comm=rt.batch_p2p_comm,  # NCCL only (see Runtime.batch_p2p_comm)
        params_dtype=dtype,
        bf16=tr.bf16,
        autocast_dtype=dtype,
        calculate_per_token_loss=tr.calculate_per_token_loss,
        attention_backend=AttnBackend[tr.attention_backend],  # TE's attention picks its backend from it
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
        **tr.recompute(),
    )
    if tr.fp8_format:
        kwargs.update(fp8=tr.fp8_format, fp8_recipe=tr.fp8_recipe)
    return TriTransformerConfig(**kwargs)
