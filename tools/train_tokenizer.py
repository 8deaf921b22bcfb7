#!/usr/bin/env python
"""Trains a byte-level BPE tokenizer (Hugging Face `tokenizers`) with per-language vocabulary quotas.

    python tools/train_tokenizer.py --input data/sample/*.jsonl --vocab-size 8000 \
        --quota ko=0.15,ja=0.15,rest=0.70 --output out/tokenizer

Each document gets a label: `NAME=FILE` on --input, else the JSON field --lang-key (default `lang`), else
a Unicode-script guess (ko, ja, zh, latin, other). Per label, a seeded reservoir keeps at most
--docs-per-language documents (balanced sampling) and sets --heldout-docs of them aside for the fertility
report. With --quota, one BPE is trained per quota group (`ko`, `ko+ja`, ...; `rest` takes every other
label) and their merges are interleaved so that each group contributes its share of the learned
vocabulary: a group's merge that another group already added is kept at no cost, so a quota counts the
tokens a group is first to need. Without --quota, one BPE is trained on the balanced sample.

Writes DIR/tokenizer.json (loadable by transformers' PreTrainedTokenizerFast and AutoTokenizer),
tokenizer_config.json, special_tokens_map.json and train_report.json (realised quotas, fertility:
tokens per character / whitespace word (not for unsegmented scripts such as Japanese) / UTF-8 byte per
label on held-out text; --compare adds other tokenizers on the same held-out text).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from tri_megatron.data.corpus import detect_language, is_jsonl, open_text  # noqa: E402

# Llama-3 / cl100k style pre-tokenization: digits in groups of <= 3, letters with one leading non-letter.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EOD, PAD = "<|endoftext|>", "<|pad|>"


def parse_quota(spec: Optional[str]) -> "OrderedDict[str, Tuple[List[str], float]]":
    """'ko=0.15,ja=0.15,rest=0.7' -> {group: (labels, share)}; shares must sum to 1."""
    out: "OrderedDict[str, Tuple[List[str], float]]" = OrderedDict()
    if not spec:
        return out
    for part in spec.split(","):
        if "=" not in part:
            raise SystemExit(f"--quota: '{part}' is not NAME=SHARE (e.g. ko=0.15,ja=0.15,rest=0.7)")
        name, share = part.split("=", 1)
        try:
            value = float(share)
        except ValueError:
            raise SystemExit(f"--quota: share of {name!r} is not a number: {share!r}") from None
        if value < 0:
            raise SystemExit(f"--quota: share of {name!r} must be >= 0")
        out[name.strip()] = ([s.strip() for s in name.split("+")], value)
    total = sum(v for _, v in out.values())
    if abs(total - 1.0) > 1e-6:
        raise SystemExit(f"--quota: shares sum to {total:.6g}, they must sum to 1")
    return out


class Reservoir:
    """Seeded reservoir sample of documents for one label."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen, self.items = size, random.Random(seed), 0, []

    def add(self, doc: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(doc)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = doc


def read_documents(inputs: List[str], json_keys: List[str], lang_key: str, keep: int, seed: int,
                   max_chars: int) -> Dict[str, Reservoir]:
    pools: Dict[str, Reservoir] = {}
    for spec in inputs:
        name, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        if not os.path.isfile(path):
            raise SystemExit(f"--input {spec}: file not found")
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if is_jsonl(path):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        print(f"warning: {path}:{line_no}: malformed JSON ({exc.msg}); skipped", file=sys.stderr)
                        continue
                    texts = [obj.get(k) for k in json_keys if isinstance(obj.get(k), str)]
                    label = name or (str(obj[lang_key]) if isinstance(obj.get(lang_key), str) else None)
                else:
                    texts, label = [line.rstrip("\n")], name
                for text in texts:
                    text = text[:max_chars]
                    lab = label or detect_language(text)
                    if lab not in pools:
                        pools[lab] = Reservoir(keep, seed ^ zlib.crc32(lab.encode()))
                    pools[lab].add(text)
    return pools


def new_tokenizer(vocab=None, merges=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(docs: List[str], vocab_size: int, specials: List[str], min_frequency: int):
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def merges_of(tok) -> List[Tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def combine(groups: "OrderedDict[str, Tuple[List[Tuple[str, str]], float]]", budget: int):
    """Interleaves per-group merge lists; returns (merges, new tokens in order, tokens charged per group)."""
    from tokenizers import pre_tokenizers

    vocab = set(pre_tokenizers.ByteLevel.alphabet())
    ptr = {g: 0 for g in groups}
    charged = {g: 0 for g in groups}
    active = [g for g, (m, share) in groups.items() if share > 0 and m]
    merges, merge_set, new_tokens = [], set(), []
    while len(new_tokens) < budget and active:
        g = min(active, key=lambda name: (charged[name] / groups[name][1], list(groups).index(name)))
        group_merges = groups[g][0]
        added = False
        while ptr[g] < len(group_merges) and not added:
            a, b = group_merges[ptr[g]]
            ptr[g] += 1
            if (a, b) in merge_set:
                continue
            merges.append((a, b))
            merge_set.add((a, b))
            if a + b not in vocab:
                vocab.add(a + b)
                new_tokens.append(a + b)
                charged[g] += 1
                added = True
        if ptr[g] >= len(group_merges):
            active.remove(g)
    return merges, new_tokens, charged


def fertility(tok, docs: List[str]) -> Dict[str, float]:
    if not docs:
        return {}
    encs = tok.encode_batch(docs, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encs)
    chars = sum(len(d) for d in docs)
    words = sum(len(d.split()) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    segmented = words > 0 and chars / words < 15  # Japanese/Chinese text has no spaces between words
    return {"docs": len(docs), "tokens": tokens, "tokens_per_char": tokens / max(1, chars),
            "tokens_per_word": tokens / words if segmented else None, "tokens_per_byte": tokens / max(1, nbytes),
            "chars_per_token": chars / max(1, tokens)}


def load_any_tokenizer(path: str):
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"--compare {path}: no tokenizer.json there")
    return Tokenizer.from_file(file)


def write_outputs(out_dir: str, tok, specials: List[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"bos_token": specials[0], "eos_token": specials[0]}
    if len(specials) > 1:
        special_map["pad_token"] = specials[1]
    config = dict(special_map, tokenizer_class="PreTrainedTokenizerFast", model_max_length=1_000_000_000,
                  clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)


def print_fertility(report: Dict[str, Dict[str, Dict[str, float]]]) -> None:
    print(f"{'tokenizer':<12} {'label':<8} {'docs':>5} {'tok/char':>9} {'tok/word':>9} {'tok/byte':>9}")
    for name, per_label in report.items():
        for label, f in per_label.items():
            if f:
                per_word = f"{f['tokens_per_word']:>9.3f}" if f["tokens_per_word"] is not None else f"{'-':>9}"
                print(f"{name:<12} {label:<8} {f['docs']:>5} {f['tokens_per_char']:>9.3f} {per_word} "
                      f"{f['tokens_per_byte']:>9.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL/text files (.gz ok), optionally LABEL=FILE")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary incl. bytes and special tokens")
    p.add_argument("--output", required=True, help="directory; writes DIR/tokenizer.json")
    p.add_argument("--quota", default=None, help="vocabulary shares per label group, e.g. ko=0.15,ja=0.15,rest=0.7")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields holding text")
    p.add_argument("--lang-key", default="lang", help="JSON field with the document's language/source label")
    p.add_argument("--docs-per-language", type=int, default=50_000, help="training documents kept per label")
    p.add_argument("--heldout-docs", type=int, default=50, help="documents per label held out for fertility")
    p.add_argument("--max-chars-per-doc", type=int, default=100_000)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--special-tokens", default=f"{EOD},{PAD}", help="comma-separated; the first is EOD/EOS")
    p.add_argument("--compare", nargs="*", default=[], help="other tokenizer.json files/dirs for the fertility table")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    t0 = time.time()
    specials = [s for s in args.special_tokens.split(",") if s]
    base = 256 + len(specials)
    if args.vocab_size <= base:
        p.error(f"--vocab-size {args.vocab_size}: must exceed 256 bytes + {len(specials)} special tokens")
    quota = parse_quota(args.quota)
    pools = read_documents(args.input, args.json_keys, args.lang_key, args.docs_per_language + args.heldout_docs,
                           args.seed, args.max_chars_per_doc)
    if not pools:
        raise SystemExit("--input: no documents found (check --json-keys)")
    train_docs: Dict[str, List[str]] = {}
    heldout: Dict[str, List[str]] = {}
    for label in sorted(pools):
        docs = list(pools[label].items)
        random.Random(args.seed ^ zlib.crc32(label.encode()) ^ 0x5EED).shuffle(docs)
        n_held = min(args.heldout_docs, len(docs) // 5)
        heldout[label], train_docs[label] = docs[:n_held], docs[n_held:]
        print(f"label {label:<8} documents seen {pools[label].seen:>8}, training {len(train_docs[label]):>6}, "
              f"held out {n_held:>4}")

    budget = args.vocab_size - base
    report: Dict = {"vocab_size": args.vocab_size, "special_tokens": specials, "labels": sorted(pools),
                    "documents": {lab: {"seen": pools[lab].seen, "train": len(train_docs[lab]),
                                        "heldout": len(heldout[lab])} for lab in sorted(pools)}}
    if quota:
        unknown = [lab for labels, _ in quota.values() for lab in labels if lab != "rest" and lab not in pools]
        if unknown:
            print(f"warning: --quota names label(s) with no documents: {unknown}", file=sys.stderr)
        group_of = {}
        for g, (labels, _) in quota.items():
            for lab in labels:
                group_of[lab] = g
        group_docs: Dict[str, List[str]] = {g: [] for g in quota}
        for label, docs in train_docs.items():
            g = group_of.get(label, "rest" if "rest" in quota else None)
            if g is None:
                print(f"warning: label {label} is in no --quota group (and there is no `rest`): not trained on",
                      file=sys.stderr)
                continue
            group_docs[g].extend(docs)
        per_group = OrderedDict()
        for g, (labels, share) in quota.items():
            if share <= 0 or not group_docs[g]:
                per_group[g] = ([], share)
                continue
            want = base + int(math.ceil(share * budget * 1.5)) + 64
            merges = merges_of(train_bpe(group_docs[g], want, specials, args.min_frequency))
            per_group[g] = (merges, share)
            print(f"group {g:<10} {len(group_docs[g]):>6} documents -> {len(merges)} candidate merges")
        merges, new_tokens, charged = combine(per_group, budget)
        for g, (_, share) in quota.items():
            if charged[g] < int(share * budget):
                print(f"warning: quota group {g} ran out of merges at {charged[g]} tokens (target "
                      f"{int(share * budget)}): its corpus is too small or repetitive; other groups filled the rest",
                      file=sys.stderr)
        from tokenizers import pre_tokenizers

        vocab = {s: i for i, s in enumerate(specials)}
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch] = len(vocab)
        for t in new_tokens:
            vocab[t] = len(vocab)
        tok = new_tokenizer(vocab, merges)
        learned = max(1, len(new_tokens))
        report["quota"] = {g: {"target": share, "realised": charged[g] / learned, "tokens": charged[g]}
                           for g, (_, share) in quota.items()}
        print("quota     target  realised  tokens")
        for g, r in report["quota"].items():
            print(f"{g:<10} {r['target']:>6.3f}  {r['realised']:>8.3f}  {r['tokens']:>6}")
    else:
        balanced = [d for docs in train_docs.values() for d in docs]
        tok = train_bpe(balanced, args.vocab_size, specials, args.min_frequency)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    final_size = tok.get_vocab_size(with_added_tokens=True)
    if final_size < args.vocab_size:
        print(f"warning: corpus too small for --vocab-size {args.vocab_size}: vocabulary has {final_size} tokens",
              file=sys.stderr)
    report["realised_vocab_size"] = final_size

    fert = {"trained": {lab: fertility(tok, docs) for lab, docs in heldout.items()}}
    for other in args.compare:
        fert[os.path.basename(os.path.normpath(other))] = {
            lab: fertility(load_any_tokenizer(other), docs) for lab, docs in heldout.items()}
    report["fertility"] = fert
    write_outputs(args.output, tok, specials)
    with open(os.path.join(args.output, "train_report.json"), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    print_fertility(fert)
    print(f"wrote {os.path.join(args.output, 'tokenizer.json')} (vocab {final_size}) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
