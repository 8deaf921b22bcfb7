"""The project's own megatron-core model, built from checkpoint metadata, for conversion and verification.

* ``args_from_meta``: a validated pretrain_tri.py namespace for an architecture (tri_meta "model" fields).
* ``ensure_single_process``: a one-process gloo group with megatron's parallel state at TP=PP=1 (CPU).
* ``load_tp1_model``: the model at TP=PP=1, loaded from a distributed checkpoint of any layout by
  megatron-core's own dist_checkpointing (``training.checkpointing.load_checkpoint``).
* ``megatron_logits`` / ``megatron_greedy``: its logits (main and MTP heads) and greedy decoding.
"""

from __future__ import annotations

import os

import torch

ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon",
               "no_rope_freq", "window_size", "window_attn_skip_freq", "mtp_num_layers", "ssmax",
               "attn_temperature_tuning", "attn_floor_scale", "attn_scale", "untie_embeddings_and_output_weights")


def args_from_meta(m: dict, tp: int = 1, pp: int = 1, vpp=None, bf16: bool = False, world: int = None):
    """pretrain_tri.py arguments for this architecture and layout; raises ArgumentError on a bad layout."""
    from tri_megatron.arguments import parse_args, validate_args

    args = parse_args(["--mock-data", "--model", "tri-tiny"])
    for field in ARCH_FIELDS:
        if field in m and m[field] is not None:
            setattr(args, field, m[field])
        elif field in ("no_rope_freq", "window_size", "window_attn_skip_freq"):
            setattr(args, field, None)
    args.mtp_num_layers = m.get("mtp_num_layers") or 0
    args.ssmax = bool(m.get("ssmax"))
    args.attn_temperature_tuning = bool(m.get("attn_temperature_tuning"))
    args.max_position_embeddings = m.get("max_position_embeddings") or m.get("seq_length") or 4096
    args.seq_length = min(m.get("seq_length") or args.max_position_embeddings, args.max_position_embeddings)
    args.model = m.get("model") or "tri"
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.virtual_pipeline_model_parallel_size = vpp
    args.micro_batch_size, args.global_batch_size = 1, pp
    args.bf16 = bf16
    args.transformer_impl = "local"
    args.no_save_optim = True
    args.train_iters = 0
    validate_args(args, world or tp * pp)
    return args


def ensure_single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tri_megatron import compat

    compat.activate()
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or dist.get_world_size() != 1:
        raise RuntimeError("verification needs a single-process megatron group (TP=PP=1)")


def build_chunks(args, init: bool = True) -> list:
    """This rank's (unwrapped) GPTModel chunks for args (local spec)."""
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config_from_args
    from tri_megatron.training.checkpointing import _unwrap

    config = transformer_config_from_args(args, False)
    config.perform_initialization = init
    return [_unwrap(c) for c in build_model_chunks(config, args, False)], config


def load_tp1_model(path: str, m: dict):
    """The TP=PP=1 fp32 model with the checkpoint's weights, loaded by megatron-core itself."""
    from tri_megatron.training.checkpointing import load_checkpoint

    ensure_single_process()
    args = args_from_meta(m)
    chunks, _ = build_chunks(args, init=False)
    load_checkpoint(path, chunks, None, None, args)
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
