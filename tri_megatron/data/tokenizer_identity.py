"""Which tokenizer produced a .bin/.idx pair, and the checks that keep token ids inside the model's vocabulary.

tools/preprocess_data.py writes ``PREFIX.tokenizer.json`` beside ``PREFIX.bin/.idx``::

    {"vocab_size": 32000, "sha256": "<hash of tokenizer.json's canonical JSON>", "eod": 0, "tokenizer": "path"}

(vocab_size counts added tokens). ``check_data_tokenizers`` runs before anything is built (pretrain_tri.py
and its --dry-run, through provider.validate_data_args) and raises ValueError, one line naming the data
file and the fix, when a prefix's vocabulary exceeds the model's --vocab-size, when the blend mixes
tokenizers, or when the data's tokenizer is not --tokenizer. Prefixes without the file (older
preprocessing, Megatron-LM's tool) get a one-line warning and a scan of the .bin's largest token id.
``check_sample_ids`` is the per-sample guard of the data path (host tensors, before any device copy).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import List, Optional

import numpy as np

from tri_megatron.launcher import launch_env

logger = logging.getLogger("tri_megatron.data")

SUFFIX = ".tokenizer.json"
# every rank runs the pre-start checks: larger .bin files are sampled (_SAMPLES evenly spaced windows of
# _WINDOW tokens); what the sample misses, the data path's per-sample check catches
_FULL_SCAN_TOKENS = 1 << 24
_SAMPLES, _WINDOW = 16, 1 << 20


def identity_path(prefix: str) -> str:
    return prefix + SUFFIX


def tokenizer_identity(tok) -> dict:
    """The identity of a TriTokenizer: vocabulary size (with added tokens), canonical-content hash, EOD id."""
    with open(tok.path, encoding="utf-8") as f:
        canonical = json.dumps(json.load(f), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"vocab_size": int(tok.vocab_size), "sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            "eod": int(tok.eod), "tokenizer": tok.path}


def write_identity(prefix: str, identity: dict) -> None:
    tmp = f"{identity_path(prefix)}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(identity, f, indent=1)
    os.replace(tmp, identity_path(prefix))


def read_identity(prefix: str) -> Optional[dict]:
    """The recorded identity, None when the file is absent; ValueError when it is unreadable."""
    path = identity_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            ident = json.load(f)
        int(ident["vocab_size"]), str(ident["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--data-path {prefix}: {path} is not a tokenizer record; re-create it with "
                         "tools/preprocess_data.py or delete it") from None
    return ident


def max_token_id(prefix: str, dtype) -> int:
    """Largest token id in PREFIX.bin: exact up to 2^24 tokens, else over evenly spaced windows."""
    mm = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    try:
        n = mm.shape[0]
        if n == 0:
            return -1
        if n <= _FULL_SCAN_TOKENS:
            return int(max(mm[lo:lo + _WINDOW].max() for lo in range(0, n, _WINDOW)))
        starts = np.linspace(0, n - _WINDOW, _SAMPLES).astype(np.int64)
        return int(max(mm[s:s + _WINDOW].max() for s in starts))
    finally:
        del mm


def check_data_tokenizers(prefixes: List[str], model_vocab: Optional[int], tokenizer=None) -> None:
    """Raise ValueError (one line: the data file and the fix) for data the model cannot embed."""
    from .indexed import check_indexed_dataset

    given = tokenizer_identity(tokenizer) if tokenizer is not None else None
    first = None  # (prefix, identity) of the first prefix with a record
    for prefix in prefixes:
        ident = read_identity(prefix)
        if ident is None:
            if model_vocab is None:
                continue
            dtype = check_indexed_dataset(prefix, deep=False).dtype
            if np.iinfo(dtype).max < model_vocab:
                continue  # the file's dtype cannot hold an id outside the vocabulary
            top = max_token_id(prefix, dtype)
            if launch_env()["rank"] == 0:
                logger.warning("--data-path %s: no %s (preprocessed before tokenizer records); checked its largest "
                               "token id (%d) against --vocab-size %d", prefix, SUFFIX, top, model_vocab)
            if top >= model_vocab:
                raise ValueError(f"--data-path {prefix}: {prefix}.bin holds token id {top} but the model's vocabulary "
                                 f"is {model_vocab}; pass the --tokenizer it was made with (or --vocab-size "
                                 f"{top + 1} or more)")
            continue
        if model_vocab is not None and ident["vocab_size"] > model_vocab:
            raise ValueError(f"--data-path {prefix}: tokenized with a {ident['vocab_size']}-token vocabulary "
                             f"({ident.get('tokenizer')}) but the model's vocabulary is {model_vocab}; pass "
                             f"--tokenizer {ident.get('tokenizer')} (or --vocab-size {ident['vocab_size']} or more)")
        if given is not None and ident["sha256"] != given["sha256"]:
            raise ValueError(f"--data-path {prefix}: tokenized with {ident.get('tokenizer')} (sha256 "
                             f"{ident['sha256'][:12]}), not --tokenizer {tokenizer.path} (sha256 {given['sha256'][:12]}); "
                             "pass the tokenizer the data was made with or re-tokenize it")
        if first is None:
            first = (prefix, ident)
        elif ident["sha256"] != first[1]["sha256"]:
            raise ValueError(f"--data-path {prefix}: tokenized with {ident.get('tokenizer')} (sha256 "
                             f"{ident['sha256'][:12]}) but {first[0]} with {first[1].get('tokenizer')} (sha256 "
                             f"{first[1]['sha256'][:12]}); a blend needs one tokenizer: re-tokenize one of them")


def check_sample_ids(sample: dict, vocab_size: Optional[int], name: str) -> None:
    """The data path's guard: a host sample whose token ids fall outside [0, vocab_size) stops the run
    naming the dataset (on a GPU it would be a device-side assert, or silently wrong with TP > 1)."""
    if vocab_size is None:
        return
    for key in ("tokens", "labels"):
        t = sample.get(key)
        if t is None or t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"--data-path {name}: a sample holds token id {hi if hi >= vocab_size else lo}, outside "
                             f"the model's vocabulary [0, {vocab_size}); re-tokenize it or pass the --tokenizer it "
                             "was made with")
