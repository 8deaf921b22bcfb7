"""Builds the Tri model: megatron-core ``GPTModel`` chunks for this pipeline rank.

``build_model_chunks`` returns one ``GPTModel`` per virtual pipeline stage held by this rank (one
without interleaving), each built from the Tri layer spec and, on the last stage, the MTP block, and
placed on the runtime's device (``tri_megatron.runtime``) before any wrapper sees it.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from tri_megatron.model.fused_loss import FusedLossGPTModel
from tri_megatron.model.specs import tri_decoder_spec, tri_layer_spec, tri_mtp_block_spec
from tri_megatron.ops._kernels import agree_on_kernels


def use_fused_loss(fused_loss, rt=None) -> bool:
    """--fused-loss (``TrainingConfig.fused_loss``): on by default where the CUDA kernel is built, off
    otherwise (the PyTorch reference of the fused op can still be asked for explicitly, e.g. on CPU)."""
    if fused_loss is not None:
        return bool(fused_loss)
    from tri_megatron import runtime
    from tri_megatron.ops import kernels_available

    return (rt or runtime.current()).cuda_kernels and kernels_available()


def build_gpt_model(config, cfg, use_te: bool, pre_process: bool, post_process: bool, vp_stage=None) -> GPTModel:
    """One GPTModel chunk of the run ``cfg`` (RunConfig) with megatron-core config ``config``."""
    agree_on_kernels()  # one kernel decision for all ranks before any layer asks (a collective, first call only)
    layer_spec = tri_layer_spec(config, use_te)
    mtp_spec = tri_mtp_block_spec(config, layer_spec, use_te, vp_stage=vp_stage) if post_process else None
    model_cls = FusedLossGPTModel if use_fused_loss(cfg.training.fused_loss) else GPTModel
    arch = cfg.arch
    return model_cls(
        config=config,
        transformer_layer_spec=tri_decoder_spec(config, layer_spec, use_te, vp_stage=vp_stage),
        vocab_size=arch.padded_vocab_size(cfg.parallel.tp),
        max_sequence_length=arch.context_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )


def build_model_chunks(config, cfg, use_te: bool, rt=None) -> list:
    """This rank's model chunks on the runtime's device (parallel_state must be initialised).

    On an accelerator megatron creates the weights there (config.use_cpu_initialization is False);
    the move catches anything created on the host (buffers, Tri parameters) before DDP, which
    allocates its grad buffers on the device and broadcasts the parameters."""
    from tri_megatron import runtime

    rt = rt or runtime.current()
    vpp = cfg.parallel.model_chunks
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = build_gpt_model(config, cfg, use_te, pre, post, vp_stage=stage)
        model.model_type = ModelType.encoder_or_decoder
        if rt.on_accelerator:
            model.to(rt.device)
        if cfg.training.bf16:  # bf16 weights and activations, fp32 logits/loss, as Megatron-LM does
            model = Float16Module(config, model)
        chunks.append(model)
    return chunks
