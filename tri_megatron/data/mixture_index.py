"""Global sample -> (dataset, dataset sample) index for a scheduled blend, built in C++ and cached on disk.

The builder (`csrc/data/mixture_index.cpp`) is megatron-core's greedy blending rule applied to cumulative
scheduled targets. Arrays: `dataset_index` int16[N] and `dataset_sample_index` int32[N] (int64 when
N >= 2^31), as .npy files named by the MD5 of a JSON description, written to temporary names and renamed,
so an interrupted build never leaves a half-written cache; loads are memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

VERSION = 1


def _helpers():
    try:
        from tri_megatron import _data_helpers
    except ImportError as exc:
        raise ImportError("tri_megatron._data_helpers (C++ data helpers) is not built; run "
                          "`pip install --no-build-isolation --use-pep517 -e .` in the repository") from exc
    return _data_helpers


@dataclass
class MixtureIndex:
    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray
    counts: np.ndarray  # samples drawn from each dataset
    build_seconds: float
    cache_path: Optional[str]

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])


def compute_mixture_index(positions: np.ndarray, weights: np.ndarray, num_samples: int,
                          out_index: Optional[np.ndarray] = None, out_sample: Optional[np.ndarray] = None):
    """Runs the C++ builder; positions are in samples, weights are [knots, datasets]."""
    sample_dtype = np.int32 if num_samples < 2**31 - 1 else np.int64
    di = np.empty(num_samples, dtype=np.int16) if out_index is None else out_index
    dsi = np.empty(num_samples, dtype=sample_dtype) if out_sample is None else out_sample
    counts = _helpers().build_mixture_index(di, dsi, np.ascontiguousarray(positions, dtype=np.float64),
                                            np.ascontiguousarray(weights, dtype=np.float64))
    return di, dsi, counts


def build_or_load(positions: np.ndarray, weights: np.ndarray, num_samples: int, cache_dir: Optional[str],
                  identity: Sequence[str] = (), load_only: bool = False) -> MixtureIndex:
    """Returns the index, from `cache_dir` when a matching one is there, else builds (and saves) it."""
    description = json.dumps({
        "class": "TriMixtureIndex", "version": VERSION, "num_samples": int(num_samples),
        "positions_samples": [float(p) for p in positions],
        "weights": [[float(x) for x in row] for row in np.asarray(weights)],
        "datasets": list(identity),
    }, indent=2)
    digest = hashlib.md5(description.encode(), usedforsecurity=False).hexdigest()
    paths = None
    if cache_dir:
        base = os.path.join(cache_dir, f"{digest}-TriMixtureIndex")
        paths = {k: f"{base}-{k}" for k in ("dataset_index.npy", "dataset_sample_index.npy", "description.json")}
        if all(os.path.isfile(p) for p in paths.values()):
            with open(paths["description.json"]) as f:
                meta = json.load(f)
            return MixtureIndex(np.load(paths["dataset_index.npy"], mmap_mode="r"),
                                np.load(paths["dataset_sample_index.npy"], mmap_mode="r"),
                                np.array(meta["counts"], dtype=np.int64), 0.0, base)
        if load_only:
            raise FileNotFoundError(f"mixture index cache {base}-* not found (rank 0 should have built it)")
    t0 = time.time()
    if paths is None:
        di, dsi, counts = compute_mixture_index(positions, weights, num_samples)
        return MixtureIndex(di, dsi, counts, time.time() - t0, None)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in paths.items()}
    try:
        sample_dtype = np.int32 if num_samples < 2**31 - 1 else np.int64
        di = np.lib.format.open_memmap(tmp["dataset_index.npy"], mode="w+", dtype=np.int16, shape=(num_samples,))
        dsi = np.lib.format.open_memmap(tmp["dataset_sample_index.npy"], mode="w+", dtype=sample_dtype,
                                        shape=(num_samples,))
        _, _, counts = compute_mixture_index(positions, weights, num_samples, di, dsi)
        di.flush()
        dsi.flush()
        del di, dsi
        meta = json.loads(description)
        meta["counts"] = [int(c) for c in counts]
        with open(tmp["description.json"], "w") as f:
            json.dump(meta, f, indent=2)
        for k in ("dataset_index.npy", "dataset_sample_index.npy", "description.json"):  # description last
            os.replace(tmp[k], paths[k])
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    seconds = time.time() - t0
    out = build_or_load(positions, weights, num_samples, cache_dir, identity, load_only=True)
    out.build_seconds = seconds
    return out
