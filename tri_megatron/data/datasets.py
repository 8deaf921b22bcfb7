"""Datasets on megatron-core's GPTDataset: per-prefix epochs, the scheduled mixture, validation blends.

A sample is megatron-core's: seq_length+1 tokens cut from the shuffled document stream of one prefix
(GPTDataset: document/sample/shuffle indices built by its C++ helper and cached as .npy). We build
GPTDatasets of exactly one epoch each and chain them: epoch e of a prefix is a GPTDataset whose seed is
derived from (seed, e), so every sample of an epoch appears once before the next epoch starts, and each
epoch has a fresh document and sample order. (megatron-core's own multi-epoch GPTDataset shuffles
documents and samples of all epochs together, which can repeat a sample before an epoch ends.)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


class NoTokenizer:
    """Stands in for a tokenizer in megatron-core's config when none is given (no EOD masking possible)."""

    vocab_size = None
    eod = -2  # never a token id; not -1, which megatron-core uses for padding (and warns on a clash)
    unique_identifiers = {"class": "NoTokenizer"}

    @property
    def pad(self) -> int:
        raise AttributeError("no pad token")


def gpt_config(seed: int, seq_length: int, prefixes: Sequence[str], split: str, cache: str, tokenizer,
               eod_mask_loss: bool, reset_position_ids: bool = False):
    """megatron-core computes loss_mask and position_ids (--eod-mask-loss, --reset-position-ids); the
    attention's document boundaries come from the collated tokens (packing.py), never as an [s, s] mask."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(list(prefixes), None), split=split,
        path_to_cache=cache, tokenizer=tokenizer, reset_position_ids=reset_position_ids,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    return seed if epoch == 0 else (seed + 1_000_003 * epoch) % (2**32 - 1)


def split_documents(num_sequences: int, split_matrix, which: int) -> Optional[np.ndarray]:
    """The document ids of split `which` (0 train, 1 valid, 2 test), rounded exactly as megatron-core does."""
    bookend = split_matrix[which]
    if bookend is None:
        return None
    beg = int(round(bookend[0] * float(num_sequences)))
    end = int(round(bookend[1] * float(num_sequences)))
    return np.arange(beg, end, dtype=np.int32) if end > beg else None


class PrefixData:
    """One --data-path prefix: its IndexedDataset, and lazily built one-epoch GPTDatasets per split."""

    def __init__(self, prefix: str, config):
        from megatron.core.datasets.gpt_dataset import GPTDataset

        self.prefix = prefix
        self.config = config
        self.indexed = GPTDataset.build_low_level_dataset(prefix, config)
        self.num_sequences = GPTDataset.numel_low_level_dataset(self.indexed)
        self._epochs: Dict[int, object] = {}
        self._valid = None
        self.train_docs = split_documents(self.num_sequences, config.split_matrix, 0)
        self.valid_docs = split_documents(self.num_sequences, config.split_matrix, 1)

    def _build(self, docs, split, seed):
        import dataclasses

        from megatron.core.datasets.gpt_dataset import GPTDataset

        config = self.config if seed == self.config.random_seed else dataclasses.replace(self.config, random_seed=seed)
        return GPTDataset(self.indexed, self.prefix, docs, None, split, config)

    def train_epoch(self, epoch: int):
        from megatron.core.datasets.utils import Split

        if self.train_docs is None:
            return None
        if epoch not in self._epochs:
            self._epochs[epoch] = self._build(self.train_docs, Split.train, epoch_seed(self.config.random_seed, epoch))
        return self._epochs[epoch]

    def train_epoch_len(self) -> int:
        ds = self.train_epoch(0)
        return 0 if ds is None else len(ds)

    def valid(self):
        from megatron.core.datasets.utils import Split

        if self._valid is None and self.valid_docs is not None:
            self._valid = self._build(self.valid_docs, Split.valid, self.config.random_seed)
        return self._valid


class EpochChain(torch.utils.data.Dataset):
    """Sample k of a prefix = sample k % n of its epoch k // n (n = samples in one epoch)."""

    def __init__(self, data: PrefixData, num_samples: int):
        self.data = data
        self.epoch_len = data.train_epoch_len()
        self.num_epochs = 0 if num_samples == 0 else -(-num_samples // self.epoch_len)
        self.epochs = [data.train_epoch(e) for e in range(self.num_epochs)]  # built up front, on rank 0 first

    def __len__(self) -> int:
        return self.num_epochs * self.epoch_len

    def __getitem__(self, k: int):
        return self.epochs[k // self.epoch_len][k % self.epoch_len]


class MixtureDataset(torch.utils.data.Dataset):
    """Global sample i -> datasets[dataset_index[i]][dataset_sample_index[i]], tagged with its domain id."""

    def __init__(self, datasets: List[torch.utils.data.Dataset], domain_ids: Sequence[int], dataset_index,
                 dataset_sample_index, vocab_size: Optional[int] = None):
        self.datasets = datasets
        self.vocab_size = vocab_size  # when set, every sample's ids are checked on the host (tokenizer_identity)
        self.domain_ids = list(domain_ids)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, i: int):
        d = int(self.dataset_index[i])
        item = dict(self.datasets[d][int(self.dataset_sample_index[i])])
        if self.vocab_size is not None:
            from .tokenizer_identity import check_sample_ids

            check_sample_ids(item, self.vocab_size, _dataset_name(self.datasets[d]))
        item["domain"] = self.domain_ids[d]
        return item


def _dataset_name(ds) -> str:
    """The --data-path prefix a dataset reads (EpochChain, megatron-core GPTDataset), for messages."""
    if isinstance(ds, EpochChain):
        return ds.data.prefix
    return str(getattr(ds, "dataset_path", None) or type(ds).__name__)


def exhaustive_blend(datasets: List[torch.utils.data.Dataset], domain_ids: Sequence[int],
                     vocab_size: Optional[int] = None) -> MixtureDataset:
    """Every sample of every dataset once, interleaved in proportion to sizes (megatron-core's helper)."""
    from megatron.core.datasets import helpers

    sizes = np.array([len(d) for d in datasets], dtype=np.int64)
    total = int(sizes.sum())
    di = np.zeros(total, dtype=np.int16)
    dsi = np.zeros(total, dtype=np.int64)
    if total:
        helpers.build_exhaustive_blending_indices(di, dsi, sizes, len(datasets))
    return MixtureDataset(datasets, domain_ids, di, dsi, vocab_size)
