"""megatron-core's `.bin/.idx` indexed-dataset format: strict checks with one-line errors, and a batch writer.

The format itself is megatron-core's (`megatron.core.datasets.indexed_dataset`): we read with its
`IndexedDataset` and write with its `IndexedDatasetBuilder`, so files interoperate with Megatron-LM
both ways. `.idx` layout: b"MMIDIDX\\x00\\x00", u64 version=1, u8 dtype code, u64 sequence count S,
u64 document count D, int32[S] lengths, int64[S] byte pointers, int64[D] document indices.
megatron-core only `assert`s on a bad file; `check_indexed_dataset` says what is wrong and how to fix it.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Type

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}
_FIXED = 9 + 8 + 1 + 8 + 8
_CHUNK = 1 << 24


@dataclass
class IndexedInfo:
    prefix: str
    dtype: Type[np.number]
    num_sequences: int
    num_documents: int  # megatron counts documents as len(document_indices) - 1
    num_tokens: int


def _fail(flag: str, prefix: str, what: str) -> ValueError:
    return ValueError(f"{flag}: {what}; re-create it with tools/preprocess_data.py "
                      f"(--output-prefix) or fix the prefix '{prefix}'")


def check_indexed_dataset(prefix: str, flag: str = "--data-path", deep: bool = True) -> IndexedInfo:
    """Validates `prefix.idx`/`prefix.bin`; raises ValueError naming the file and the fix."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx, bin_) if not os.path.isfile(p)]
    if missing:
        raise _fail(flag, prefix, f"{' and '.join(missing)} not found")
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    if idx_size < _FIXED:
        raise _fail(flag, prefix, f"{idx} is truncated ({idx_size} bytes, header needs {_FIXED})")
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if head[:9] != _HEADER:
        raise _fail(flag, prefix, f"{idx} is not a megatron indexed-dataset index (bad magic header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise _fail(flag, prefix, f"{idx} has unsupported version {version} (expected 1)")
    if code not in _DTYPES:
        raise _fail(flag, prefix, f"{idx} has unknown dtype code {code}")
    dtype = _DTYPES[code]
    expected = _FIXED + n_seq * 12 + n_doc * 8
    if idx_size not in (expected, expected + n_seq):  # + n_seq: multimodal files carry int8 modes
        raise _fail(flag, prefix, f"{idx} is truncated or corrupt ({idx_size} bytes, counts imply {expected})")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    try:
        lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_FIXED)
        pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_FIXED + 4 * n_seq)
        docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_FIXED + 12 * n_seq)
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq:
            raise _fail(flag, prefix, f"{idx} has inconsistent document indices")
        itemsize = np.dtype(dtype).itemsize
        num_tokens = 0
        for lo in range(0, n_seq, _CHUNK):  # chunked: bounded memory on files with billions of documents
            chunk = lengths[lo:lo + _CHUNK]
            if deep:
                if (chunk < 0).any():
                    raise _fail(flag, prefix, f"{idx} is corrupt (negative sequence lengths)")
                expect = np.cumsum(chunk, dtype=np.int64) - chunk + num_tokens
                if not np.array_equal(pointers[lo:lo + _CHUNK], expect * itemsize):
                    raise _fail(flag, prefix, f"{idx} is corrupt (sequence pointers do not match lengths)")
            num_tokens += int(chunk.sum(dtype=np.int64))
        if num_tokens * itemsize != bin_size:
            raise _fail(flag, prefix, f"{bin_} has {bin_size} bytes but {idx} describes "
                                      f"{num_tokens * itemsize} (truncated or mismatched pair)")
        if deep:
            for lo in range(0, n_doc, _CHUNK):
                if (np.diff(docs[lo:lo + _CHUNK + 1]) < 0).any():
                    raise _fail(flag, prefix, f"{idx} is corrupt (document indices out of order)")
    finally:
        del mm
    return IndexedInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, num_tokens)


def optimal_dtype(vocab_size: int):
    """Token dtype for the .bin file, the same rule as megatron-core/Megatron-LM's preprocess_data.py."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def make_builder(bin_path: str, dtype):
    """megatron-core's IndexedDatasetBuilder with `add_documents` for many single-sequence documents at once."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    class BatchBuilder(IndexedDatasetBuilder):
        def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
            """Appends len(lengths) documents whose tokens are concatenated in `tokens`."""
            self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes(order="C"))
            start = len(self.sequence_lengths)
            self.sequence_lengths.extend(lengths.tolist())
            self.document_indices.extend(range(start + 1, start + len(lengths) + 1))

    return BatchBuilder(bin_path, dtype=dtype)
