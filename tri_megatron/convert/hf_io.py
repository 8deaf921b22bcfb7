"""Hugging Face checkpoint files: a lazy safetensors reader, a sharded writer, tokenizer files.

* ``HFCheckpoint``: config.json plus ``model.safetensors`` or sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json``; tensors are read one at a time (safe_open), shapes from headers.
* ``ShardWriter``: writes ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_size``
  bytes and their ``model.safetensors.index.json`` (always an index, even for one shard).
* ``find_tokenizer`` / ``copy_tokenizer``: tokenizer.json plus tokenizer_config.json (copied if it
  sits next to the tokenizer, otherwise written) and special_tokens_map.json when present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


class HFCheckpoint:
    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        with open(cfg_path) as f:
            self.config = json.load(f)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: Dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    f"(only safetensors checkpoints are supported)")
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise FileNotFoundError(f"{path}: missing shard file(s) {', '.join(missing)} named by the index")
        self._handles = {}

    def _file(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.path, fname), "pt")
        return self._handles[fname]

    def shape(self, name: str) -> tuple:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        name = next(n for n in self.weight_map if n.endswith("embed_tokens.weight"))
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name} is missing")
        return self._file(name).get_tensor(name)


class ShardWriter:
    def __init__(self, out_dir: str, max_shard_size: int):
        self.out_dir, self.max = out_dir, max_shard_size
        self.current: Dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files = []  # [(tmp name, [tensor names])]
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().clone()  # own storage: safetensors refuses shared tensors
        n = t.numel() * t.element_size()
        if self.current and self.current_bytes + n > self.max:
            self._flush()
        self.current[name] = t
        self.current_bytes += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.current, os.path.join(self.out_dir, tmp), metadata={"format": "pt"})
        os.chmod(os.path.join(self.out_dir, tmp), 0o644)  # safetensors creates files owner-only
        self.files.append((tmp, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> Dict[str, str]:
        if self.current:
            self._flush()
        n, weight_map = len(self.files), {}
        for k, (tmp, names) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return weight_map


def find_tokenizer(explicit: Optional[str], *dirs: str) -> Optional[str]:
    """tokenizer.json from --tokenizer (file or directory) or the first directory holding one."""
    if explicit:
        from tri_megatron.data.tokenizer import resolve_tokenizer_file

        return resolve_tokenizer_file(explicit)
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return os.path.join(d, "tokenizer.json")
    return None


def copy_tokenizer(tokenizer_json: str, out_dir: str, model_max_length: int) -> dict:
    """Copy the tokenizer files; returns the special token ids for config.json / generation_config.json."""
    from tri_megatron.data.tokenizer import TriTokenizer

    src_dir = os.path.dirname(tokenizer_json)
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    for extra in ("special_tokens_map.json",):
        if os.path.isfile(os.path.join(src_dir, extra)):
            shutil.copyfile(os.path.join(src_dir, extra), os.path.join(out_dir, extra))
    tok = TriTokenizer(tokenizer_json)
    cfg_src = os.path.join(src_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_src):
        shutil.copyfile(cfg_src, os.path.join(out_dir, "tokenizer_config.json"))
        with open(cfg_src) as f:
            tcfg = json.load(f)
    else:
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                "eos_token": tok.eod_token, "bos_token": tok.eod_token}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=True)

    def token_id(key):
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None

    ids = {"eos_token_id": tok.eod, "bos_token_id": token_id("bos_token"), "pad_token_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v is not None}
