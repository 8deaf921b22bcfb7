"""FLOP accounting for the Tri architecture (Megatron's convention).

Model FLOPs per token count 2 FLOPs per multiply-add and 3 passes (forward + backward at twice the
forward): QKV projections with GQA, causal attention *halved* (each query sees on average s/2 keys,
Megatron's convention; sliding-window layers see w(1 - w/2s)), output projection, SwiGLU FFN
(3 h f), the output layer once per head (main + MTP), and each MTP module as an extra layer plus its
2h -> h projection. PaLM/torchtitan count attention without the causal halving, so their MFU reads
higher for the same run. Hardware FLOPs add the recomputed forward work.
"""

from __future__ import annotations

from typing import Optional

# Dense bf16 peak of one device, TFLOP/s (no sparsity). MFU is always against these.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0}


def detect_peak_tflops() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _attended_keys(seq_length: int, window: Optional[int]) -> float:
    if not window or window >= seq_length:
        return seq_length / 2.0
    return window * (1.0 - window / (2.0 * seq_length))


def layer_forward_flops_per_token(h, f, heads, groups, kv_channels, seq_length, window=None) -> dict:
    q = heads * kv_channels
    kv = groups * kv_channels
    return {
        "qkv": 2 * h * (q + 2 * kv),
        "attention": 2 * 2 * q * _attended_keys(seq_length, window),  # QK^T and AV
        "proj": 2 * q * h,
        "mlp": 2 * 3 * h * f,
    }


def _is_window_layer(layer_number: int, window, skip_freq) -> bool:
    if not window:
        return False
    return skip_freq is None or layer_number % skip_freq != 0


def forward_flops_per_token(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                            kv_channels, vocab_size, seq_length, mtp_num_layers=0, window_size=None,
                            window_attn_skip_freq=None, **_ignored) -> float:
    total = 0.0
    for layer_number in range(1, num_layers + mtp_num_layers + 1):
        w = window_size if _is_window_layer(layer_number, window_size, window_attn_skip_freq) else None
        total += sum(layer_forward_flops_per_token(hidden_size, ffn_hidden_size, num_attention_heads,
                                                   num_query_groups, kv_channels, seq_length, w).values())
    total += mtp_num_layers * 2 * (2 * hidden_size) * hidden_size  # eh_proj
    total += (1 + mtp_num_layers) * 2 * hidden_size * vocab_size  # output layer per head
    return total


def model_flops_per_iteration(args, batch_tokens: int) -> float:
    """Model FLOPs (fwd + bwd) of one iteration over batch_tokens tokens."""
    return 3.0 * batch_tokens * forward_flops_per_token(**_arch(args))


def hardware_flops_per_iteration(args, batch_tokens: int) -> float:
    """Model FLOPs plus the forward work recomputed by activation checkpointing."""
    arch = _arch(args)
    model = 3.0 * forward_flops_per_token(**arch)
    extra = 0.0
    if args.recompute_granularity == "full":
        layers = arch["num_layers"]
        frac = 1.0
        if args.recompute_method == "block" and args.recompute_num_layers is not None:
            per_stage = layers // args.pipeline_model_parallel_size
            frac = min(args.recompute_num_layers, per_stage) / per_stage
        no_head = dict(arch, vocab_size=0, mtp_num_layers=0)
        extra = frac * forward_flops_per_token(**no_head)
    elif args.recompute_granularity == "selective":  # core attention recomputed
        h = arch["hidden_size"]
        for n in range(1, arch["num_layers"] + arch["mtp_num_layers"] + 1):
            w = arch["window_size"] if _is_window_layer(n, arch["window_size"], arch["window_attn_skip_freq"]) else None
            extra += layer_forward_flops_per_token(h, arch["ffn_hidden_size"], arch["num_attention_heads"],
                                                   arch["num_query_groups"], arch["kv_channels"],
                                                   arch["seq_length"], w)["attention"]
    return batch_tokens * (model + extra)


def _arch(args) -> dict:
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
        mtp_num_layers=args.mtp_num_layers or 0,
        window_size=args.window_size,
        window_attn_skip_freq=args.window_attn_skip_freq,
    )
