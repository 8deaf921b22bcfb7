"""Model flags: ``--model PRESET`` and the architecture overrides, resolved once into a ``ModelArch``,
plus the architecture's own consistency checks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tri_megatron.config.arch import ModelArch
from tri_megatron.config.errors import ArgumentError
from tri_megatron.config.presets import PRESETS, get_preset

# flag dest -> ModelArch field, for flags that are architecture fields under another name
_RENAMED = {"max_position_embeddings": "context_length"}
# ModelArch fields without a flag of their own
_NO_FLAG = {"name"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tri-tiny", choices=sorted(PRESETS), help="architecture preset")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--vocab-size", type=int, help="default: the --tokenizer's vocabulary, else the preset's")
    g.add_argument("--max-position-embeddings", type=int,
                   help="raise the preset's context length (needed for --seq-length above it)")
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--no-rope-freq", type=int, help="iRoPE: every k-th layer skips RoPE (0 = off)")
    g.add_argument("--window-size", type=int, help="sliding window in tokens on RoPE layers (0 = off)")
    g.add_argument("--window-attn-skip-freq", type=int, help="every k-th layer uses full attention")
    g.add_argument("--mtp-num-layers", type=int, help="multi-token prediction depth D (default 0)")
    g.add_argument("--ssmax", action="store_true", default=None,
                   help="Scalable-Softmax: scale q by s_h*log(n), learnable s per layer and head")
    g.add_argument("--attn-temperature-tuning", action="store_true", default=None,
                   help="Llama-4/Tri-70B query temperature tuning on NoPE layers")
    g.add_argument("--no-attn-temperature-tuning", dest="attn_temperature_tuning", action="store_false")
    g.add_argument("--attn-floor-scale", type=float)
    g.add_argument("--attn-scale", type=float)
    g.add_argument("--init-method-std", type=float)


def resolve_arch(ns: argparse.Namespace, tokenizer_vocab: Optional[int] = None) -> ModelArch:
    """The preset with every architecture flag given on the command line applied. The vocabulary follows
    the tokenizer (``tokenizer_vocab``) unless ``--vocab-size`` is given."""
    values = {}
    for f in dataclasses.fields(ModelArch):
        if f.name in _NO_FLAG:
            continue
        dest = next((d for d, field in _RENAMED.items() if field == f.name), f.name)
        v = getattr(ns, dest, None)
        if v is not None:
            values[f.name] = v
    if "vocab_size" not in values and tokenizer_vocab is not None:
        values["vocab_size"] = tokenizer_vocab
    return get_preset(ns.model).arch.replace(**values)


def validate_arch(arch: ModelArch) -> None:
    """Raise ArgumentError (one line: the flag and the fix) for an inconsistent architecture."""
    if arch.num_attention_heads % arch.num_query_groups:
        raise ArgumentError(f"--num-attention-heads {arch.num_attention_heads} is not a multiple of "
                            f"--num-query-groups {arch.num_query_groups}")
    if arch.vocab_size < 2:
        raise ArgumentError(f"--vocab-size {arch.vocab_size}: must be at least 2")
    if arch.ssmax and arch.attn_temperature_tuning:
        raise ArgumentError("--ssmax and --attn-temperature-tuning are two forms of query scaling; pick one")
    if arch.attn_temperature_tuning and not arch.no_rope_freq:
        raise ArgumentError("--attn-temperature-tuning acts on NoPE layers only; set --no-rope-freq (e.g. 4)")
    if arch.no_rope_freq and arch.num_layers % arch.no_rope_freq:
        raise ArgumentError(f"--num-layers {arch.num_layers} is not divisible by --no-rope-freq {arch.no_rope_freq}")
    if arch.mtp_num_layers < 0:
        raise ArgumentError(f"--mtp-num-layers {arch.mtp_num_layers}: must be >= 0")
    _refuse_release_dependent_mtp_layers(arch)


def _refuse_release_dependent_mtp_layers(arch: ModelArch) -> None:
    """megatron-core numbers the MTP block's layers L+1..L+D up to 0.18 and 1..D from 0.19 on
    (``mcore_internals.mtp_transformer_layer_number``), and that number decides NoPE and sliding windows.
    Refuse the patterns where the two numberings disagree: the model would change with the release, and
    differ from the Hugging Face export (MTP layers with RoPE, windows by L+d)."""
    L, D = arch.num_layers, arch.mtp_num_layers
    if not D:
        return
    if arch.no_rope_freq and D >= arch.no_rope_freq:
        raise ArgumentError(f"--mtp-num-layers {D} with --no-rope-freq {arch.no_rope_freq}: megatron-core 0.19 would "
                            f"make MTP layer {arch.no_rope_freq} a NoPE layer, earlier releases would not; use "
                            f"--mtp-num-layers {arch.no_rope_freq - 1} or less")
    skip = arch.window_attn_skip_freq
    if arch.window_size and skip and any((d % skip == 0) != ((L + d) % skip == 0) for d in range(1, D + 1)):
        raise ArgumentError(f"--mtp-num-layers {D} with --window-attn-skip-freq {skip} and --num-layers {L}: the MTP "
                            f"layers' sliding windows would differ between megatron-core releases; use a "
                            f"--num-layers divisible by {skip}")
