"""Loads a Hugging Face `tokenizer.json` (a file, or a directory holding one) for preprocessing and training.

`TriTokenizer` is the small interface both our tools and megatron-core's GPTDataset config need:
`vocab_size`, `eod`, `tokenize`, `encode_batch`, `detokenize` and `unique_identifiers` (megatron-core
hashes it into its dataset cache key). The end-of-document id is, in order: the `eos_token` of a
`tokenizer_config.json` next to the file, else the first known end-of-text token in the vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>", "<eod>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


def resolve_tokenizer_file(path: str) -> str:
    """`path` may be a tokenizer.json or a directory holding one; returns the file, or raises ValueError."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise ValueError(f"--tokenizer {path}: directory has no tokenizer.json; "
                             "train one with tools/train_tokenizer.py or pass the file itself")
        return candidate
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file or directory; pass a tokenizer.json or its directory")
    return path


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TriTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids training needs."""

    def __init__(self, path: str, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        self.path = os.path.abspath(resolve_tokenizer_file(path))
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ValueError(f"--tokenizer {path}: not a valid tokenizer.json ({exc})") from None
        with open(self.path, "rb") as f:
            self._sha = hashlib.sha1(f.read()).hexdigest()
        config = {}
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as exc:
                raise ValueError(f"--tokenizer {path}: {config_path} is not valid JSON ({exc}); fix or remove it") \
                    from None
            if not isinstance(config, dict):
                raise ValueError(f"--tokenizer {path}: {config_path} is not a JSON object; fix or remove it")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = [eod_token] if eod_token else []
        names += [n for n in (_token_content(config.get("eos_token")),) if n] + list(EOD_CANDIDATES)
        self.eod_token = next((n for n in names if n in vocab), None)
        if self.eod_token is None:
            raise ValueError(f"--tokenizer {path}: no end-of-document token found (looked for {names}); "
                             "add one, e.g. <|endoftext|>, as a special token")
        self.eod = vocab[self.eod_token]
        pad_names = [n for n in (_token_content(config.get("pad_token")),) if n] + list(PAD_CANDIDATES)
        self.pad_id = next((vocab[n] for n in pad_names if n in vocab and vocab[n] != self.eod), None)
        self.unique_identifiers = {"class": "TriTokenizer", "sha1": self._sha, "eod": self.eod}

    # megatron-core's MegatronDataset reads `.pad` and falls back to -1 when it raises: we keep -1 so
    # that loss masking is exactly megatron's (documents never contain padding in our .bin files).
    @property
    def pad(self) -> int:
        raise AttributeError("pad is not exposed to megatron-core datasets")

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok
