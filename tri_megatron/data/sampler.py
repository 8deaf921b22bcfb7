"""Micro-batch index order of megatron's MegatronPretrainingSampler, so the data position is consumed_samples.

Global batch g covers global samples [consumed + g*GBS, consumed + (g+1)*GBS). Inside each chunk of
micro_batch_size * dp_size consecutive samples, DP rank r takes [r*mbs, (r+1)*mbs). Ranks are disjoint
and together cover every sample; the order depends only on the sample index, never on the layout.
"""
from __future__ import annotations

from typing import Iterator, List, Optional


class PretrainingBatchSampler:
    """Yields this rank's micro-batches of sample indices, from `consumed_samples` to `total_samples`.

    With `wrap_length`, indices are taken modulo it and the sampler never ends (validation).
    """

    def __init__(self, total_samples: Optional[int], consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, wrap_length: Optional[int] = None):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs, self.rank, self.dp = micro_batch_size, dp_rank, dp_size
        self.wrap = wrap_length

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp
        start = self.consumed
        while self.total is None or start + step <= self.total:
            first = start + self.rank * self.mbs
            idx = list(range(first, first + self.mbs))
            yield [i % self.wrap for i in idx] if self.wrap else idx
            start += step

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an endless sampler has no length")
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp))
