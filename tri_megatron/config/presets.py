"""Model presets: tri-tiny (CPU-sized), tri-7b, tri-21b, tri-70b, with the published dimensions.

Each preset is a ``ModelArch`` (tri_megatron.config.arch) plus where its numbers come from and the
parameter count its authors state. ``--model NAME`` starts from ``PRESETS[NAME].arch``;
``python -m tri_megatron.config.presets`` prints each preset's parameter count.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tri_megatron.config.arch import ModelArch


@dataclasses.dataclass(frozen=True)
class Preset:
    arch: ModelArch
    published_params: Optional[float] = None  # parameter count stated by the model's authors
    source: str = ""


PRESETS = {
    p.arch.name: p
    for p in [
        # CPU-sized model for tests and the quickstart. Four layers so iRoPE (freq 4) fits.
        Preset(
            arch=ModelArch(
                name="tri-tiny",
                num_layers=4,
                hidden_size=128,
                ffn_hidden_size=384,
                num_attention_heads=4,
                num_query_groups=2,
                kv_channels=32,
                vocab_size=1024,
                context_length=256,
            ),
            source="project choice: smallest shape that exercises GQA, TP=2, PP=2xVPP=2 and iRoPE",
        ),
        # Tri-7B model card: 7.76B parameters, 32 layers, 32 attention heads, vocab 128,256,
        # context 32,768, Llama-style. The card gives no hidden/FFN sizes: we take Llama's hidden
        # 4,096 with 8 KV groups (GQA, as Llama-3) and FFN 13,696 (= 107 x 128), the multiple of 128
        # that lands closest to 7.76B (7.778B, +0.2%).
        Preset(
            arch=ModelArch(
                name="tri-7b",
                num_layers=32,
                hidden_size=4096,
                ffn_hidden_size=13696,
                num_attention_heads=32,
                num_query_groups=8,
                kv_channels=128,
                vocab_size=128256,
                context_length=32768,
            ),
            published_params=7.76e9,
            source="Tri-7B model card (layers, heads, vocab, context, 7.76B); hidden/FFN: our fit",
        ),
        # Tri-21B: 20.73B parameters. The Tri-21B card says 32 layers, but 20.73B only adds up with
        # 40 layers, which the Tri-21B-Think card states. Hidden 5,120, FFN 27,392, 32 query / 8 KV
        # heads of dim 160, vocab 124,416, context 8,192, untied embeddings.
        Preset(
            arch=ModelArch(
                name="tri-21b",
                num_layers=40,
                hidden_size=5120,
                ffn_hidden_size=27392,
                num_attention_heads=32,
                num_query_groups=8,
                kv_channels=160,
                vocab_size=124416,
                context_length=8192,
            ),
            published_params=20.73e9,
            source="Tri-21B / Tri-21B-Think model cards",
        ),
        # Tri-70B-preview config (model_type "trillion"): 80 layers, hidden 8,192, FFN 28,672,
        # 64 query / 8 KV heads of dim 128, vocab 124,416, context 32,768, rope_theta 10,000,
        # untied; global_attention_freq 4: layers 3, 7, 11, ... (0-based) are NoPE with full
        # causal attention and query temperature tuning; the others use RoPE with a 4,096-token
        # sliding window.
        Preset(
            arch=ModelArch(
                name="tri-70b",
                num_layers=80,
                hidden_size=8192,
                ffn_hidden_size=28672,
                num_attention_heads=64,
                num_query_groups=8,
                kv_channels=128,
                vocab_size=124416,
                context_length=32768,
                rotary_base=10000.0,
                no_rope_freq=4,
                window_size=4096,
                window_attn_skip_freq=4,
                attn_temperature_tuning=True,
            ),
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


def main() -> None:
    print(f"{'preset':10s} {'parameters':>16s} {'published':>12s}  source")
    for name, p in PRESETS.items():
        pub = f"{p.published_params / 1e9:.2f}B" if p.published_params else "-"
        print(f"{name:10s} {p.arch.num_parameters():16,d} {pub:>12s}  {p.source}")


if __name__ == "__main__":
    main()
