"""Model presets: tri-tiny (CPU-sized), tri-7b, tri-21b, tri-70b, with the published dimensions.

Every preset is a plain dataclass of architecture numbers; ``arguments.py`` turns it into flags
defaults and ``model/config.py`` into a megatron-core ``TransformerConfig``. ``python -m
tri_megatron.presets`` prints each preset's parameter count.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    seq_length: int  # the preset's context length (max_position_embeddings)
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    no_rope_freq: Optional[int] = None  # iRoPE: every k-th layer (1-based k, 2k, ...) skips RoPE
    window_size: Optional[int] = None  # sliding window (tokens a query sees, itself included)
    window_attn_skip_freq: Optional[int] = None  # every k-th layer uses full attention
    attn_temperature_tuning: bool = False  # Llama-4 query temperature scaling on NoPE layers
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    published_params: Optional[float] = None  # parameter count stated by the model's authors
    source: str = ""


PRESETS = {
    p.name: p
    for p in [
        # CPU-sized model for tests and the quickstart. Four layers so iRoPE (freq 4) fits.
        Preset(
            name="tri-tiny",
            num_layers=4,
            hidden_size=128,
            ffn_hidden_size=384,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=32,
            vocab_size=1024,
            seq_length=256,
            source="project choice: smallest shape that exercises GQA, TP=2, PP=2xVPP=2 and iRoPE",
        ),
        # Tri-7B model card: 7.76B parameters, 32 layers, 32 attention heads, vocab 128,256,
        # context 32,768, Llama-style. The card gives no hidden/FFN sizes: we take Llama's hidden
        # 4,096 with 8 KV groups (GQA, as Llama-3) and FFN 13,696 (= 107 x 128), the multiple of 128
        # that lands closest to 7.76B (7.778B, +0.2%).
        Preset(
            name="tri-7b",
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=13696,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            vocab_size=128256,
            seq_length=32768,
            published_params=7.76e9,
            source="Tri-7B model card (layers, heads, vocab, context, 7.76B); hidden/FFN: our fit",
        ),
        # Tri-21B: 20.73B parameters. The Tri-21B card says 32 layers, but 20.73B only adds up with
        # 40 layers, which the Tri-21B-Think card states. Hidden 5,120, FFN 27,392, 32 query / 8 KV
        # heads of dim 160, vocab 124,416, context 8,192, untied embeddings.
        Preset(
            name="tri-21b",
            num_layers=40,
            hidden_size=5120,
            ffn_hidden_size=27392,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=160,
            vocab_size=124416,
            seq_length=8192,
            published_params=20.73e9,
            source="Tri-21B / Tri-21B-Think model cards",
        ),
        # Tri-70B-preview config (model_type "trillion"): 80 layers, hidden 8,192, FFN 28,672,
        # 64 query / 8 KV heads of dim 128, vocab 124,416, context 32,768, rope_theta 10,000,
        # untied; global_attention_freq 4: layers 3, 7, 11, ... (0-based) are NoPE with full
        # causal attention and query temperature tuning; the others use RoPE with a 4,096-token
        # sliding window.
        Preset(
            name="tri-70b",
            num_layers=80,
            hidden_size=8192,
            ffn_hidden_size=28672,
            num_attention_heads=64,
            num_query_groups=8,
            kv_channels=128,
            vocab_size=124416,
            seq_length=32768,
            rotary_base=10000.0,
            no_rope_freq=4,
            window_size=4096,
            window_attn_skip_freq=4,
            attn_temperature_tuning=True,
            # The Tri-70B card calls the model 70B; the dimensions above give 70.49B, which is what
            # the Llama-3-70B layout gives with a 124,416 vocabulary.
            published_params=70.49e9,
            source="trillionlabs/Tri-70B-preview config.json (model_type trillion)",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown --model {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def count_parameters(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    vocab_size: int,
    untie_embeddings_and_output_weights: bool = True,
    mtp_num_layers: int = 0,
    ssmax: bool = False,
    **_ignored,
) -> int:
    """Exact parameter count of the megatron-core GPT model we build (no biases, RMSNorm)."""
    h, f = hidden_size, ffn_hidden_size
    q = num_attention_heads * kv_channels
    kv = num_query_groups * kv_channels
    attention = h * (q + 2 * kv) + q * h
    mlp = 2 * h * f + f * h  # SwiGLU: fc1 = [gate; up], fc2
    norms = 2 * h
    layer = attention + mlp + norms + (num_attention_heads if ssmax else 0)
    embeddings = vocab_size * h * (2 if untie_embeddings_and_output_weights else 1)
    # MTP layer: enorm + hnorm + eh_proj (2h -> h) + a transformer layer + its final norm.
    mtp = mtp_num_layers * (2 * h + 2 * h * h + layer + h)
    return num_layers * layer + h + embeddings + mtp


def preset_parameters(preset: Preset, **overrides) -> int:
    return count_parameters(**{**dataclasses.asdict(preset), **overrides})


def main() -> None:
    print(f"{'preset':10s} {'parameters':>16s} {'published':>12s}  source")
    for p in PRESETS.values():
        n = preset_parameters(p)
        pub = f"{p.published_params / 1e9:.2f}B" if p.published_params else "-"
        print(f"{p.name:10s} {n:16,d} {pub:>12s}  {p.source}")


if __name__ == "__main__":
    main()
