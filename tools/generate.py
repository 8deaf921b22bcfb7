#!/usr/bin/env python
"""Generate text from a checkpoint: the sanity check after training (CPU, one process, offline).

    python tools/generate.py PATH --prompt "TEXT" [--max-new-tokens 32]
    python tools/generate.py PATH --prompt-ids 5,17,42 [--top-p 0.9 --temperature 0.8 --seed 1]

PATH is a --save directory (its newest complete iteration), one iter_NNNNNNN directory (any TP/PP/VPP
layout: loaded at TP=PP=1 by megatron-core), or a Hugging Face directory (e.g. a --to-hf export).
The tokenizer is --tokenizer, else the one recorded in the --save directory or the export. Greedy by
default; --top-p and/or --temperature sample (nucleus sampling, seeded by --seed: the same seed gives
the same text). Generation stops at the end-of-sequence token (unless --ignore-eos) or after
--max-new-tokens. Prints the prompt followed by the generated text (the token ids too with --show-ids,
or only ids when there is no tokenizer). Each step recomputes the whole sequence: fine for a sanity
check, not a server. Exit codes: 0 done, 2 bad input (nothing loaded).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("path", metavar="PATH", help="--save directory, iter_NNNNNNN directory or Hugging Face directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the recorded one)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens with this "
                   "probability mass (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--show-ids", action="store_true", help="also print the prompt and generated token ids")
    return p


def _fail(message: str) -> int:
    print(f"generate.py: error: {message}", file=sys.stderr)
    return 2


def run(argv=None, out=print) -> dict:
    """Parse, check, load and generate; returns {"prompt": ids, "new": ids, "text": str or None}.
    Raises GenerateError on bad input (before anything is loaded)."""
    from tri_megatron.convert.generate import GenerateError, generate, open_source

    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature is not None and not args.temperature > 0:
        raise GenerateError(f"--temperature {args.temperature:g}: must be > 0 (leave both --temperature and --top-p "
                            f"out for greedy decoding)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p {args.top_p:g}: must be in (0, 1]")
    sample = args.temperature is not None or args.top_p is not None
    temperature, top_p = (args.temperature or 1.0, args.top_p or 1.0) if sample else (0.0, 1.0)
    source = open_source(args.path, args.tokenizer)
    tok = None
    if source.tokenizer:
        from tri_megatron.data.tokenizer import TriTokenizer

        tok = TriTokenizer(source.tokenizer)
    if args.prompt is not None:
        if tok is None:
            raise GenerateError(f"--prompt needs a tokenizer: none recorded with {args.path}; pass --tokenizer "
                                f"or --prompt-ids")
        prompt = tok.tokenize(args.prompt)
    else:
        try:
            prompt = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise GenerateError(f"--prompt-ids {args.prompt_ids!r}: use comma-separated integers, e.g. 5,17,42") \
                from None
    if not prompt:
        raise GenerateError("the prompt is empty")
    bad = [i for i in prompt if not 0 <= i < source.vocab_size]
    if bad:
        raise GenerateError(f"--prompt-ids: {bad[:5]} outside the vocabulary (0..{source.vocab_size - 1})")
    total = len(prompt) + args.max_new_tokens
    if source.context_length and total > source.context_length:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens}: {len(prompt)} prompt + {args.max_new_tokens} "
                            f"new tokens exceed the model's context length {source.context_length}")
    print(f"generate: {source.kind} {source.path}, {len(prompt)} prompt tokens, up to {args.max_new_tokens} new, "
          + (f"top-p {top_p:g} temperature {temperature:g} seed {args.seed}" if sample else "greedy")
          + ("" if source.eos_id is None or args.ignore_eos else f", stops at token {source.eos_id}"),
          file=sys.stderr, flush=True)
    new = generate(source.load(), prompt, args.max_new_tokens, temperature, top_p, args.seed,
                   stop_at_eos=not args.ignore_eos)
    text = tok.detokenize(prompt + new) if tok is not None else None
    if text is not None:
        out(text)
    if args.show_ids or text is None:
        out("prompt ids: " + " ".join(map(str, prompt)))
        out("new ids: " + " ".join(map(str, new)))
    return {"prompt": prompt, "new": new, "text": text}


def main(argv=None) -> int:
    from tri_megatron.convert.generate import GenerateError

    try:
        run(argv)
    except GenerateError as e:
        return _fail(str(e))
    return 0


if __name__ == "__main__":
    import warnings

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # one CPU process, like the converter (before torch is imported)
    warnings.filterwarnings("ignore")  # megatron-core warns at import about optional fused kernels
    sys.exit(main())
