"""Synthetic, learnable training data for --mock-data (no files).

Each sample is an arithmetic progression of token ids modulo the vocabulary, with a start and a
stride drawn from the sample index: a model that has learned the rule predicts every token after
the second, so the loss falls from log(vocab) quickly. Sample i is the same whatever the layout.
The batch layout and order follow tri_megatron.data's contract (megatron's pretraining sampler).

With the packed-sample flags (--eod-mask-loss, --reset-position-ids, --reset-attention-mask) a sample is
instead several such progressions ("documents", lengths drawn from the sample index), each ended by the
EOD token ``vocab_size - 1`` (which no document token uses), cut to seq_length + 1 tokens; position ids,
loss mask and document boundaries follow the flags as for file data (tri_megatron.data.packing).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tri_megatron.data import packing
from tri_megatron.data.sampler import PretrainingBatchSampler


def mock_sample(index: int, seq_length: int, vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng((seed, index))
    start = int(rng.integers(vocab_size))
    stride = int(rng.integers(1, 3))
    return (start + stride * np.arange(seq_length + 1)) % vocab_size


def mock_packed_sample(index: int, seq_length: int, vocab_size: int, seed: int) -> np.ndarray:
    """seq_length + 1 tokens of EOD-ended progressions (EOD = vocab_size - 1); 1 to ~4 documents start in it."""
    rng = np.random.default_rng((seed, index, 1))
    eod, parts, n = vocab_size - 1, [], 0
    while n < seq_length + 1:
        length = int(rng.integers(1, max(2, seq_length // 2)))
        start, stride = int(rng.integers(eod)), int(rng.integers(1, 3))
        parts.append(np.append((start + stride * np.arange(length)) % eod, eod))
        n += length + 1
    return np.concatenate(parts)[:seq_length + 1]


def micro_batch(indices, seq_length: int, vocab_size: int, seed: int, config=None) -> dict:
    """One micro-batch; ``config`` (tri_megatron.data.config.DataConfig) turns on packed documents."""
    packed = config is not None and config.needs_eod
    sample = mock_packed_sample if packed else mock_sample
    data = torch.from_numpy(np.stack([sample(i, seq_length, vocab_size, seed) for i in indices])).long()
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    eod = vocab_size - 1
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": packing.eod_loss_mask(tokens, eod) if packed and config.eod_mask_loss
        else torch.ones(tokens.shape, dtype=torch.float),
        "position_ids": packing.reset_position_ids(tokens, eod) if packed and config.reset_position_ids
        else torch.arange(seq_length).unsqueeze(0).expand_as(tokens).contiguous(),
    }
    if packed and config.packed:
        packing.add_boundaries(batch, eod)
    return batch


class MockData:
    """Same interface as tri_megatron.data.provider's DataBundle, for --mock-data."""

    def __init__(self, seq_length: int, vocab_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, valid_offset: int = 10**9, config: Optional[object] = None):
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.valid_offset = valid_offset
        self.config = config  # DataConfig: packed documents when it asks for EOD handling
        self.eod_id = vocab_size - 1 if config is not None and config.needs_eod else None
        self.valid_domains = ["mock"]

    def train_iterator(self, consumed_samples: int):
        for idx in PretrainingBatchSampler(None, consumed_samples, self.mbs, self.dp_rank, self.dp_size):
            yield micro_batch(idx, self.seq_length, self.vocab_size, self.seed, self.config)

    def valid_iterator(self, domain: str):
        for idx in PretrainingBatchSampler(None, self.valid_offset, self.mbs, self.dp_rank, self.dp_size):
            yield micro_batch(idx, self.seq_length, self.vocab_size, self.seed, self.config)
