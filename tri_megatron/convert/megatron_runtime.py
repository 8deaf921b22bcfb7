"""The project's own megatron-core model, built from checkpoint metadata, for conversion and verification.

* ``run_config_for``: a validated run configuration for an architecture (tri_meta "model" fields) and layout.
* ``load_tp1_model``: the model at TP=PP=1, loaded from a distributed checkpoint of any layout by
  megatron-core's own dist_checkpointing (``training.checkpointing.load_checkpoint``).
* ``megatron_logits`` / ``megatron_greedy``: its logits (main and MTP heads) and greedy decoding.
"""

from __future__ import annotations

import torch

def run_config_for(m: dict, tp: int = 1, pp: int = 1, vpp=None, bf16: bool = False, world: int = None):
    """The RunConfig (tri_megatron.config) of the model tri_meta's "model" record ``m`` describes, laid out
    at TP x PP (x VPP) on ``world`` processes (default TP x PP), local layers, weights only; raises
    ArgumentError when the layout does not fit the model."""
    from tri_megatron.config.arch import ModelArch
    from tri_megatron.config.checkpoint import CheckpointConfig
    from tri_megatron.config.fault import FaultConfig
    from tri_megatron.config.logs import LoggingConfig
    from tri_megatron.config.optim import OptimConfig
    from tri_megatron.config.parallel import ParallelConfig
    from tri_megatron.config.run import RunConfig, validate
    from tri_megatron.config.training import TrainingConfig
    from tri_megatron.config.export import ExportConfig
    from tri_megatron.data.config import DataConfig

    arch = ModelArch.from_meta(m)
    dp = max(1, (world or tp * pp) // (tp * pp))
    seq = min(m.get("seq_length") or arch.context_length, arch.context_length)
    cfg = RunConfig(
        arch=arch, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, dp=dp),
        training=TrainingConfig(seq_length=seq, micro_batch_size=1, global_batch_size=pp * dp, train_iters=0,
                                bf16=bf16, transformer_impl="local"),
        optim=OptimConfig(), data=DataConfig(mock_data=True), checkpoint=CheckpointConfig(no_save_optim=True),
        fault=FaultConfig(), logging=LoggingConfig(), export=ExportConfig())
    validate(cfg)
    return cfg


def build_chunks(cfg, init: bool = True) -> list:
    """This rank's (unwrapped) GPTModel chunks of the run ``cfg`` (local spec)."""
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config
    from tri_megatron.training.checkpointing import _unwrap

    config = transformer_config(cfg, False)
    config.perform_initialization = init
    return [_unwrap(c) for c in build_model_chunks(config, cfg, False)], config


def load_tp1_model(path: str, m: dict):
    """The TP=PP=1 fp32 model with the checkpoint's weights, loaded by megatron-core itself."""
    from tri_megatron.local_dist import init_single_process
    from tri_megatron.training.checkpointing import load_checkpoint

    init_single_process()
    cfg = run_config_for(m)
    chunks, _ = build_chunks(cfg, init=False)
    load_checkpoint(path, chunks, None, None, cfg.parallel)
    model = chunks[0].eval()
    return model


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor):
    """(main logits [b, s, padded_vocab], [MTP logits per depth]) in fp32."""
    captured = []
    hook = model.output_layer.register_forward_hook(lambda mod, inp, out: captured.append(out[0].detach().float().clone()))
    try:
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mtp = bool(model.config.mtp_num_layers)
        model(tokens, pos, None, labels=tokens.clone() if mtp else None)
    finally:
        hook.remove()
    logits = [x.transpose(0, 1).contiguous() for x in captured]  # [s, b, v] -> [b, s, v]
    return logits[-1], logits[:-1]  # megatron runs the MTP heads first, the main head last


@torch.no_grad()
def megatron_greedy(model, prompt: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Greedy decoding with full recomputation (no KV cache), padded vocabulary rows excluded."""
    x = prompt
    for _ in range(new_tokens):
        logits, _ = megatron_logits(model, x)
        x = torch.cat([x, logits[:, -1, :vocab_size].argmax(-1, keepdim=True)], dim=1)
    return x
