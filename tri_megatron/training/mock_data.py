"""Synthetic, learnable training data for --mock-data (no files).

Each sample is an arithmetic progression of token ids modulo the vocabulary, with a start and a
stride drawn from the sample index: a model that has learned the rule predicts every token after
the second, so the loss falls from log(vocab) quickly. Sample i is the same whatever the layout.
The batch layout and order follow tri_megatron.data's contract (megatron's pretraining sampler).
"""

from __future__ import annotations

import numpy as np
import torch

from tri_megatron.data.sampler import PretrainingBatchSampler


def mock_sample(index: int, seq_length: int, vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng((seed, index))
    start = int(rng.integers(vocab_size))
    stride = int(rng.integers(1, 3))
    return (start + stride * np.arange(seq_length + 1)) % vocab_size


def micro_batch(indices, seq_length: int, vocab_size: int, seed: int) -> dict:
    data = torch.from_numpy(np.stack([mock_sample(i, seq_length, vocab_size, seed) for i in indices]))
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(tokens.shape, dtype=torch.float),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand_as(tokens).contiguous(),
    }


class MockData:
    """Same interface as tri_megatron.data.provider's DataBundle, for --mock-data."""

    def __init__(self, seq_length: int, vocab_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, valid_offset: int = 10**9):
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.valid_offset = valid_offset
        self.eod_id = None
        self.valid_domains = ["mock"]

    def train_iterator(self, consumed_samples: int):
        for idx in PretrainingBatchSampler(None, consumed_samples, self.mbs, self.dp_rank, self.dp_size):
            yield micro_batch(idx, self.seq_length, self.vocab_size, self.seed)

    def valid_iterator(self, domain: str):
        for idx in PretrainingBatchSampler(None, self.valid_offset, self.mbs, self.dp_rank, self.dp_size):
            yield micro_batch(idx, self.seq_length, self.vocab_size, self.seed)
