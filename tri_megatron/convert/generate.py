"""Sampling from a checkpoint (``tools/generate.py``): the sanity check after training.

The source is either our megatron-core checkpoint (a --save directory or one iteration directory, any
TP/PP/VPP layout: megatron-core's dist_checkpointing loads it at TP=PP=1 in this one process, fp32) or
a Hugging Face directory (our export or any causal LM transformers loads, fp32). ``open_source`` checks
everything it can before a model is built (the path, the tokenizer, the context length) and raises
``GenerateError`` (one line) otherwise.

One decoding loop serves both sources: each step recomputes the whole sequence (no KV cache) and picks
the next token from the last position's logits over the real vocabulary (padded rows never chosen):
the argmax (greedy), or a sample from the top-p nucleus of softmax(logits / temperature) drawn with a
``torch.Generator`` seeded once (the same seed, the same tokens). Generation stops after the requested
number of tokens or at the end-of-sequence token (the tokenizer's for our checkpoints, the export's
generation_config.json otherwise) unless asked to ignore it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, List, Optional

import torch


class GenerateError(ValueError):
    """Bad input for generation: the message names the argument or file and the fix."""


@dataclasses.dataclass
class Source:
    """What to generate from: its kind, real vocabulary, context length, tokenizer and end-of-sequence id,
    and (once ``load``-ed) the function from token ids [1, s] to the last position's fp32 logits [vocab]."""

    path: str
    kind: str  # "megatron" or "hf"
    vocab_size: int
    context_length: Optional[int]
    tokenizer: Optional[str]
    eos_id: Optional[int]
    meta: Optional[dict] = None  # tri_meta "model" (megatron)
    next_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def load(self) -> "Source":
        if self.kind == "hf":
            from tri_megatron.convert.verify import load_hf_model

            model = load_hf_model(self.path)

            @torch.no_grad()
            def next_logits(ids):
                return model(input_ids=ids, use_cache=False).logits[0, -1, : self.vocab_size].float()
        else:
            from tri_megatron.convert.megatron_runtime import load_tp1_model, megatron_logits

            model = load_tp1_model(self.path, self.meta)

            def next_logits(ids):
                return megatron_logits(model, ids)[0][0, -1, : self.vocab_size].float()
        self.next_logits = next_logits
        return self


def _hf_eos(path: str, cfg: dict) -> Optional[int]:
    gen = os.path.join(path, "generation_config.json")
    eos = cfg.get("eos_token_id")
    if os.path.isfile(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id", eos)
    return eos[0] if isinstance(eos, list) and eos else eos


def open_source(path: str, tokenizer: Optional[str] = None) -> Source:
    """Describe the checkpoint or HF directory at ``path`` (nothing loaded yet)."""
    from tri_megatron.convert.hf_io import find_tokenizer

    if not os.path.isdir(path):
        raise GenerateError(f"{path}: no such directory; pass a --save directory, an iter_NNNNNNN directory or a "
                            f"Hugging Face export")
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        tok = _tokenizer(tokenizer, path)
        return Source(path, "hf", int(cfg["vocab_size"]), cfg.get("max_position_embeddings"), tok,
                      _hf_eos(path, cfg) if not tokenizer else _eod(tok))
    from tri_megatron.convert.megatron_ckpt import CheckpointError, read_checkpoint_meta, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
        m = read_checkpoint_meta(ckpt)["model"]
    except CheckpointError as e:
        raise GenerateError(f"{e}; or pass a Hugging Face directory (config.json)") from None
    tok = _tokenizer(tokenizer, ckpt, os.path.dirname(ckpt)) if tokenizer else find_tokenizer(
        None, ckpt, os.path.dirname(ckpt))
    return Source(ckpt, "megatron", int(m["vocab_size"]), m.get("max_position_embeddings") or m.get("seq_length"),
                  tok, _eod(tok), meta=m)


def _tokenizer(explicit: Optional[str], *dirs: str) -> Optional[str]:
    from tri_megatron.convert.hf_io import find_tokenizer

    try:
        return find_tokenizer(explicit, *dirs)
    except ValueError as e:
        raise GenerateError(str(e)) from None


def _eod(tokenizer: Optional[str]) -> Optional[int]:
    if not tokenizer:
        return None
    from tri_megatron.data.tokenizer import TriTokenizer

    try:
        return TriTokenizer(tokenizer).eod
    except ValueError as e:
        raise GenerateError(str(e)) from None


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf: the most probable tokens whose probabilities, in
    decreasing order, first reach ``top_p`` in sum (the token that crosses it included; at least one)."""
    if top_p >= 1.0:
        return logits
    probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the more probable tokens
    drop = before >= top_p
    drop[..., 0] = False
    out = logits.clone()
    out[order[drop]] = float("-inf")
    return out


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> int:
    """The next token from one position's logits: argmax when temperature is 0, else a top-p sample."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(top_p_filter(logits.double() / temperature, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(source: Source, prompt: List[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_at_eos: bool = True) -> List[int]:
    """The new tokens after ``prompt`` (at most max_new_tokens; the end-of-sequence token, when met, is the last)."""
    generator = torch.Generator().manual_seed(seed) if temperature else None
    ids = torch.tensor([prompt], dtype=torch.long)
    new: List[int] = []
    for _ in range(max_new_tokens):
        token = pick(source.next_logits(ids), temperature, top_p, generator)
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if stop_at_eos and source.eos_id is not None and token == source.eos_id:
            break
    return new
