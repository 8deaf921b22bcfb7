"""Hugging Face checkpoint files: a lazy safetensors reader, a sharded writer, tokenizer files.

* ``HFCheckpoint``: config.json plus ``model.safetensors`` or sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json`` (and the MTP modules of a Llama export, kept out of that index in
  ``mtp-*.safetensors`` with ``mtp.safetensors.index.json``); tensors are read one at a time with plain
  reads, shapes from headers.
* ``ShardWriter``: given the plan of every tensor (name, shape, dtype) first, writes
  ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_size`` bytes tensor by tensor
  (headers up front, each tensor's bytes at its offset: memory independent of the shard size) and
  their ``model.safetensors.index.json`` (always an index, even for one shard; ``prefix="mtp"`` names
  another set of shards and index). The bytes are those ``safetensors.torch.save_file`` writes
  (``safetensors_layout``).
* ``record_tokenizer``: the trainer's copy of its --tokenizer into --save (rank 0, atomic), where
  ``find_tokenizer`` finds it for ``--to-hf``.
* ``find_tokenizer`` / ``copy_tokenizer``: tokenizer.json, special_tokens_map.json when present and
  tokenizer_config.json (the source's, or one written, with ``model_max_length`` = the context length);
  the special-token ids for config.json / generation_config.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MTP_INDEX = "mtp.safetensors.index.json"  # the index of a Llama export's MTP shards (mtp-*.safetensors)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with their own mappings, so a freed
    tensor's memory goes back to the OS at once. Streaming allocates and frees one tensor after
    another; with glibc's default (a threshold that rises to 32 MiB after the first large free) the
    heap keeps freed buffers and the process's resident set creeps up with the number of tensors.
    Process-wide and harmless; returns False where there is no glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # M_MMAP_THRESHOLD in malloc.h
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


# safetensors' dtype names, and the order its writer lays tensors out in (higher rank first, then by name)
ST_DTYPES = {torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2), torch.int16: ("I16", 5),
             torch.float16: ("F16", 7), torch.bfloat16: ("BF16", 8), torch.int32: ("I32", 9),
             torch.float32: ("F32", 11), torch.float64: ("F64", 12), torch.int64: ("I64", 13)}
ST_TORCH = {name: dt for dt, (name, _) in ST_DTYPES.items()}


class TensorSpec(NamedTuple):
    """A tensor to be written: name, shape and dtype, known before its values are."""
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def safetensors_layout(specs: Sequence[TensorSpec], metadata: Optional[dict] = None) -> Tuple[bytes, Dict[str, int]]:
    """(header bytes, {name: byte offset of its data in the file}) exactly as safetensors' ``save_file``
    lays out these tensors: an 8-byte little-endian header length, the JSON header (``__metadata__``
    first, tensors by descending dtype rank then name, compact) padded with spaces to 8 bytes, data."""
    order = sorted(specs, key=lambda s: (-ST_DTYPES[s.dtype][1], s.name))
    entries, pos = {}, 0
    if metadata is not None:
        entries["__metadata__"] = metadata
    rel = {}
    for s in order:
        entries[s.name] = {"dtype": ST_DTYPES[s.dtype][0], "shape": [int(x) for x in s.shape],
                           "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, {name: start + off for name, off in rel.items()}


def read_safetensors_header(path: str) -> Tuple[dict, int]:
    """(header entries without __metadata__, byte offset where the data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _as_bytes(t: torch.Tensor):
    """A writable/readable byte view of a contiguous tensor's storage (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


class HFCheckpoint:
    """A Hugging Face directory read one tensor at a time with plain file reads (no memory map, so
    resident memory is the tensors the caller holds, never the files)."""

    def __init__(self, path: str):
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
            header, _ = read_safetensors_header(os.path.join(path, "model.safetensors"))
            self.weight_map = {k: "model.safetensors" for k in header}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    f"(only safetensors checkpoints are supported)")
        mtp_index = os.path.join(path, MTP_INDEX)
        if os.path.isfile(mtp_index):  # a Llama export's MTP modules, outside the standard loaders' index
            with open(mtp_index) as f:
                self.weight_map.update(json.load(f)["weight_map"])
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise FileNotFoundError(f"{path}: missing shard file(s) {', '.join(missing)} named by the index")
        self._headers: Dict[str, Tuple[dict, int]] = {}

    def _entry(self, name: str) -> Tuple[str, dict, int]:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name} is missing")
        fname = self.weight_map[name]
        if fname not in self._headers:
            self._headers[fname] = read_safetensors_header(os.path.join(self.path, fname))
        header, start = self._headers[fname]
        if name not in header:
            raise KeyError(f"{self.path}: tensor {name} is not in {fname} (the index names it there)")
        return os.path.join(self.path, fname), header[name], start

    def shape(self, name: str) -> tuple:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self) -> torch.dtype:
        name = next(n for n in self.weight_map if n.endswith("embed_tokens.weight"))
        return ST_TORCH[self._entry(name)[1]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        path, info, start = self._entry(name)
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=ST_TORCH[info["dtype"]])
        if end > begin:
            with open(path, "rb") as f:
                f.seek(start + begin)
                if f.readinto(_as_bytes(t)) != end - begin:
                    raise ValueError(f"{path}: truncated data for tensor {name}")
        return t


class ShardWriter:
    """Writes planned tensors into ``{prefix}-0000k-of-0000N.safetensors`` shards as they are produced.

    The plan (every tensor's name, shape and dtype, in production order) is known first, so the shard
    split (the greedy rule: a new shard when the next tensor would take it past ``max_shard_size``),
    each file's header and each tensor's offset are fixed up front; ``add`` writes one tensor's bytes
    at its offset and keeps nothing. Memory is the caller's one tensor, whatever the shard size.
    The files are byte-identical to ``safetensors.torch.save_file`` of the same tensors per shard.
    """

    def __init__(self, out_dir: str, max_shard_size: int, plan: Sequence[TensorSpec], prefix: str = "model"):
        self.out_dir, self.prefix = out_dir, prefix
        shards: List[List[TensorSpec]] = []
        size = 0
        for spec in plan:
            if not shards or (shards[-1] and size + spec.nbytes > max_shard_size):
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self.files = [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.spec: Dict[str, TensorSpec] = {}
        self.where: Dict[str, Tuple[int, int]] = {}  # name -> (shard, file offset)
        self.headers: List[bytes] = []
        self.left = [len(s) for s in shards]  # tensors still to write, per shard
        for k, specs in enumerate(shards):
            header, offsets = safetensors_layout(specs, {"format": "pt"})
            self.headers.append(header)
            for s in specs:
                if s.name in self.spec:
                    raise ValueError(f"tensor {s.name} is planned twice")
                self.spec[s.name] = s
                self.where[s.name] = (k, offsets[s.name])
        self.total = sum(s.nbytes for s in plan)
        self._open: Dict[int, int] = {}  # shard -> file descriptor
        self._written = set()

    def _fd(self, k: int) -> int:
        if k not in self._open:
            path = os.path.join(self.out_dir, self.files[k])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.chmod(path, 0o644)
            os.pwrite(fd, self.headers[k], 0)
            self._open[k] = fd
        return self._open[k]

    def add(self, name: str, t: torch.Tensor) -> None:
        spec = self.spec.get(name)
        if spec is None or name in self._written:
            raise ValueError(f"tensor {name} is {'written twice' if spec else 'not in the plan'}")
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
            raise ValueError(f"tensor {name}: {list(t.shape)} {t.dtype}, planned {list(spec.shape)} {spec.dtype}")
        k, offset = self.where[name]
        fd = self._fd(k)
        data = _as_bytes(t.detach().contiguous())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        self._written.add(name)
        self.left[k] -= 1
        if not self.left[k]:
            os.close(self._open.pop(k))

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def finish(self) -> Dict[str, str]:
        self.close()
        missing = sorted(set(self.spec) - self._written)
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]}")
        weight_map = {name: self.files[k] for name, (k, _) in self.where.items()}
        with open(os.path.join(self.out_dir, f"{self.prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return weight_map


def record_tokenizer(tokenizer: Optional[str], save_dir: Optional[str], rank: int, log=print) -> Optional[str]:
    """Record the run's --tokenizer in --save (rank 0; each file written beside and renamed into place),
    so that ``--to-hf`` ships it: tokenizer.json, and tokenizer_config.json / special_tokens_map.json
    when they sit next to it (a stale one of those from an earlier tokenizer is removed). Returns the
    recorded tokenizer.json, or None when there is nothing to record or this is not rank 0."""
    if rank != 0 or not tokenizer or not save_dir:
        return None
    from tri_megatron.data.tokenizer import resolve_tokenizer_file

    src = resolve_tokenizer_file(tokenizer)
    os.makedirs(save_dir, exist_ok=True)
    dst = os.path.join(save_dir, "tokenizer.json")
    if os.path.isfile(dst) and not _same_bytes(src, dst):
        log(f"tri_megatron: --save {save_dir}: replacing the tokenizer recorded there by --tokenizer {tokenizer}")
    for name in TOKENIZER_FILES:
        source = src if name == "tokenizer.json" else os.path.join(os.path.dirname(src), name)
        target = os.path.join(save_dir, name)
        if not os.path.isfile(source):
            if os.path.isfile(target):
                os.remove(target)
        elif not (os.path.isfile(target) and _same_bytes(source, target)):
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
    return dst


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def find_tokenizer(explicit: Optional[str], *dirs: str) -> Optional[str]:
    """tokenizer.json from --tokenizer (file or directory) or the first directory holding one (the
    iteration directory, then the --save directory the trainer recorded it in)."""
    if explicit:
        from tri_megatron.data.tokenizer import resolve_tokenizer_file

        return resolve_tokenizer_file(explicit)
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return os.path.join(d, "tokenizer.json")
    return None


NO_SPECIAL_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def copy_tokenizer(tokenizer_json: str, out_dir: str, model_max_length: int) -> dict:
    """Copy the tokenizer files into an export (tokenizer_config.json with ``model_max_length`` = the
    model's context length); returns the special-token ids for config.json / generation_config.json:
    eos = the end-of-document token training used, bos = the configured bos token (else eos, as
    tools/train_tokenizer.py configures it), pad = the pad token (None when there is none)."""
    from tokenizers import Tokenizer

    from tri_megatron.data.tokenizer import TriTokenizer

    src_dir = os.path.dirname(tokenizer_json)
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    special_map = os.path.join(src_dir, "special_tokens_map.json")
    if os.path.isfile(special_map):
        shutil.copyfile(special_map, os.path.join(out_dir, "special_tokens_map.json"))
    tok = TriTokenizer(tokenizer_json)
    vocab = Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=True)
    names = {i: n for n, i in vocab.items()}
    cfg_src = os.path.join(src_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_src):
        with open(cfg_src) as f:
            tcfg = json.load(f)
    else:
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eod_token, "bos_token": tok.eod_token}
        if tok.pad_id is not None:
            tcfg["pad_token"] = names[tok.pad_id]
    tcfg["model_max_length"] = int(model_max_length)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)

    def token_id(key):
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None

    bos = token_id("bos_token")
    return {"bos_token_id": tok.eod if bos is None else bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad_id}
