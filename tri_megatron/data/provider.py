"""The training loop's data contract: flags, validation, and `build_data` -> `DataBundle`.

    add_data_args(parser)        --data-path, --data-mixture-schedule, --split, --data-cache-path,
                                 --tokenizer, --num-workers, --eod-mask-loss, --reset-position-ids,
                                 --reset-attention-mask, --mock-data (declared by config.DataConfig)
    validate_data_args(args)     ValueError (one line: flag + fix) for bad files, schedule, split, a
                                 --vocab-size below the tokenizer's or the data's (tokenizer_identity.py)
    data_vocab_size(args)        the tokenizer's vocabulary size, or None without --tokenizer
    build_data(args, dp_rank=, dp_size=, train_samples=, eval_samples=) -> DataBundle   (collective when
                                 torch.distributed is initialised: rank 0 builds the caches first)

`args` is RunConfig.data_args()'s flat view (or a parsed Namespace): its data flags are read once into the
typed DataConfig (config.py); only seq_length, micro_batch_size, seed and vocab_size come from beside them.

Domains: a --data-path prefix's domain is its file name without `_text_document` (data/ko_text_document
-> ko) unless the schedule's `domains:` groups it; prefixes of one domain share its weight in proportion
to their --data-path weights (or to their sizes when the blend has none). Without a schedule the blend is
Megatron's static one. Global sample i -> (prefix, sample) comes from the cached C++ mixture index, so the
data position is just consumed_samples (see sampler.py for the per-rank order).

Micro-batch dict: tokens, labels (next token), loss_mask (float; 1 everywhere, except with
--eod-mask-loss 0 where tokens == EOD, as megatron-core does), position_ids (0..seq-1; restarting after
each EOD with --reset-position-ids), domain (index into bundle.domains) — each [micro_batch_size,
seq_length] (domain: [micro_batch_size]); with --reset-attention-mask also cu_seqlens (int32, the
document boundaries over the micro-batch's tokens sample after sample) and max_seqlen (int), see packing.py.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import numpy as np

from .config import DataConfig

logger = logging.getLogger("tri_megatron.data")


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags (declared by tri_megatron.data.config.DataConfig)."""
    from .config import DataConfig

    return DataConfig.add_flags(parser)


@dataclass
class _Plan:
    prefixes: List[str]
    prefix_weights: Optional[List[float]]
    prefix_domains: List[str]
    domains: List[str]
    schedule: object  # MixtureSchedule or None
    split_matrix: list
    tokenizer: object  # TriTokenizer or None


def _parse_blend(data_path) -> tuple:
    from megatron.core.datasets.utils import get_blend_from_list

    items = [tok for entry in (data_path or []) for tok in str(entry).split()]
    if not items:
        raise ValueError("--data-path: no data given; pass '.bin/.idx' prefixes (or 'w1 prefix1 w2 prefix2'), "
                         "or use --mock-data")

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    prefixes, weights = get_blend_from_list(items)
    if weights is None and any(is_number(p) for p in prefixes):
        raise ValueError("--data-path: mixes weights and prefixes; use 'w1 prefix1 w2 prefix2 ...' or prefixes only")
    if weights is not None:
        if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-path: blend weights {weights} must be >= 0 with a positive sum")
    return list(prefixes), (list(map(float, weights)) if weights is not None else None)


def _parse_split(split: str):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    try:
        vector = parse_and_normalize_split(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        vector = None
    if vector is None or not np.all(np.isfinite(vector)) or vector[0] <= 0:
        raise ValueError(f"--split {split!r}: give train,valid,test parts like 98,2,0 with a positive train part")
    return convert_split_vector_to_split_matrix(vector)


def _data_config(args) -> DataConfig:
    """The typed data part of ``args`` (a DataConfig itself, RunConfig.data_args()'s flat view, or a parsed
    Namespace holding the data flags)."""
    return args if isinstance(args, DataConfig) else DataConfig.from_args(args)


def _plan(cfg: DataConfig, model_vocab: Optional[int]) -> _Plan:
    from .indexed import check_indexed_dataset
    from .schedule import load_schedule, resolve_domains
    from .tokenizer import TriTokenizer

    prefixes, weights = _parse_blend(cfg.data_path)
    for prefix in prefixes:
        check_indexed_dataset(prefix, "--data-path")
    cfg.validate()
    tokenizer = TriTokenizer(cfg.tokenizer) if cfg.tokenizer else None
    schedule = load_schedule(cfg.data_mixture_schedule) if cfg.data_mixture_schedule else None
    prefix_domains = resolve_domains(prefixes, schedule)
    present = list(dict.fromkeys(prefix_domains))
    if schedule is not None:
        schedule.check_domains(present)
        domains = list(schedule.domains)
    else:
        domains = present
    split_matrix = _parse_split(cfg.split)
    if tokenizer is not None and model_vocab is not None and model_vocab < tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {model_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
                         f"({tokenizer.path}); pass --vocab-size {tokenizer.vocab_size} or more")
    from .tokenizer_identity import check_data_tokenizers

    check_data_tokenizers(prefixes, model_vocab, tokenizer)
    return _Plan(prefixes, weights, prefix_domains, domains, schedule, split_matrix, tokenizer)


def validate_data_args(args) -> None:
    """Raises ValueError (one line naming the flag and the fix); for --mock-data only the file-free checks."""
    cfg = _data_config(args)
    if cfg.mock_data:
        cfg.validate()
        return
    _plan(cfg, getattr(args, "vocab_size", None))


def _rank0_first(fn):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            try:
                return fn()
            finally:
                dist.barrier()
        dist.barrier()
    return fn()


def _is_first_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def data_vocab_size(args) -> Optional[int]:
    """The tokenizer's vocabulary size when --tokenizer is given (cheap: reads only the tokenizer)."""
    from .tokenizer import TriTokenizer

    tokenizer = _data_config(args).tokenizer
    return TriTokenizer(tokenizer).vocab_size if tokenizer else None


def _collate(batch, eod_for_boundaries: Optional[int] = None):
    from torch.utils.data import default_collate

    out = default_collate(batch)
    for key in ("tokens", "labels", "position_ids", "domain"):
        if key in out:
            out[key] = out[key].long()
    out["loss_mask"] = out["loss_mask"].float()
    if eod_for_boundaries is not None:  # --reset-attention-mask: the documents of the micro-batch
        from .packing import add_boundaries

        add_boundaries(out, eod_for_boundaries)
    return out


@dataclass
class DataBundle:
    """This rank's data. `valid_domains` is ["all"] (every validation sample, interleaved by size) followed by
    each domain that has validation samples when there are several; empty when the split gives none.
    `train_iterator` ends after `train_samples` (= train_iters * global_batch_size)."""

    vocab_size: Optional[int]
    eod_id: Optional[int]
    domains: List[str]
    valid_domains: List[str]
    seq_length: int
    train_samples: int
    fingerprint: str  # changes when the sample order would change (not with --train-iters); store with checkpoints
    schedule: object
    prefix_domain_ids: List[int]
    epochs_per_prefix: List[int]
    _train: object = field(repr=False, default=None)
    _valid: Dict[str, object] = field(repr=False, default_factory=dict)
    _index: object = field(repr=False, default=None)
    _layout: tuple = (1, 0, 1, 0)  # micro_batch_size, dp_rank, dp_size, num_workers
    packed: bool = False  # --reset-attention-mask: micro-batches carry cu_seqlens / max_seqlen (packing.py)

    def _loader(self, dataset, sampler):
        import torch

        mbs, rank, dp, workers = self._layout
        collate = functools.partial(_collate, eod_for_boundaries=self.eod_id if self.packed else None)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                collate_fn=collate, pin_memory=False))

    def train_iterator(self, consumed_samples: int = 0) -> Iterator[dict]:
        """This rank's micro-batches from global sample `consumed_samples` on; ends after train_samples."""
        from .sampler import PretrainingBatchSampler

        mbs, rank, dp, _ = self._layout
        if consumed_samples > self.train_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is past the {self.train_samples} training samples "
                             "the data index was built for; raise --train-iters")
        return self._loader(self._train, PretrainingBatchSampler(self.train_samples, consumed_samples, mbs, rank, dp))

    def valid_iterator(self, domain: str) -> Iterator[dict]:
        """Endless micro-batches over `domain`'s validation split, from its start (wraps around at the end)."""
        from .sampler import PretrainingBatchSampler

        if domain not in self._valid:
            raise KeyError(f"no validation data for domain {domain!r}; have {self.valid_domains}")
        mbs, rank, dp, _ = self._layout
        ds = self._valid[domain]
        return self._loader(ds, PretrainingBatchSampler(None, 0, mbs, rank, dp, wrap_length=len(ds)))

    def weights_at(self, consumed_samples: int) -> Dict[str, float]:
        """Scheduled weight per domain at this position (for logging)."""
        return self.schedule.weights_at(consumed_samples, self.seq_length)

    def realised_shares(self, start: int, end: int) -> Dict[str, float]:
        """Share of global samples [start, end) that each domain received (= share of tokens)."""
        end = min(end, self.train_samples)
        counts = np.bincount(np.asarray(self._index.dataset_index[start:end]), minlength=len(self.prefix_domain_ids))
        per_domain = np.zeros(len(self.domains))
        np.add.at(per_domain, self.prefix_domain_ids, counts)
        total = max(1, end - start)
        return {d: float(c) / total for d, c in zip(self.domains, per_domain)}


def build_data(args, *, dp_rank: int, dp_size: int, train_samples: int, eval_samples: int) -> DataBundle:
    """Builds (or loads from the cache) every index and returns this rank's DataBundle."""
    # Long because index building runs on rank 0 first (a closure shared with the cache check) and the
    # bundle needs every piece it computes; the steps themselves live in datasets.py / mixture_index.py.
    from .datasets import EpochChain, NoTokenizer, PrefixData, exhaustive_blend, gpt_config
    from .mixture_index import build_or_load
    from .schedule import static_schedule

    data_cfg = _data_config(args)
    model_vocab = getattr(args, "vocab_size", None)  # every sample's ids are checked against it (host side)
    plan = _plan(data_cfg, model_vocab)
    seq_length, mbs = int(args.seq_length), int(args.micro_batch_size)
    cache = data_cfg.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(plan.prefixes[0])), "cache")
    tokenizer = plan.tokenizer or NoTokenizer()
    config = gpt_config(int(args.seed), seq_length, plan.prefixes, data_cfg.split, cache, tokenizer,
                        data_cfg.eod_mask_loss, data_cfg.reset_position_ids)
    domain_id = {d: i for i, d in enumerate(plan.domains)}
    prefix_domain_ids = [domain_id[d] for d in plan.prefix_domains]

    def build():
        data = [PrefixData(p, config) for p in plan.prefixes]
        epoch_lens = np.array([d.train_epoch_len() for d in data], dtype=np.float64)
        # weight of each prefix inside its domain
        raw = np.array(plan.prefix_weights, dtype=np.float64) if plan.prefix_weights else epoch_lens.copy()
        schedule = plan.schedule
        if schedule is None:
            per_domain = {d: 0.0 for d in plan.domains}
            for w, d in zip(raw, plan.prefix_domains):
                per_domain[d] += w
            if sum(per_domain.values()) <= 0:
                raise ValueError(f"--data-path: no prefix has a training sample of --seq-length {seq_length}+1 "
                                 "tokens; add data or lower --seq-length")
            schedule = static_schedule(per_domain)
        within = np.zeros(len(data))
        for k, dom in enumerate(plan.domains):
            members = [i for i, d in enumerate(plan.prefix_domains) if d == dom]
            total = raw[members].sum()
            if total > 0:
                within[members] = raw[members] / total
        sched_cols = [schedule.domains.index(plan.prefix_domains[i]) for i in range(len(data))]
        W = schedule.weights[:, sched_cols] * within[None, :]
        for i, d in enumerate(data):
            if W[:, i].max() > 0 and epoch_lens[i] == 0:
                raise ValueError(f"--data-path: {d.prefix} has no training sample of --seq-length {seq_length}+1 "
                                 f"tokens in its train split but a positive weight; add data, lower --seq-length "
                                 f"or give it weight 0")
        for k, dom in enumerate(schedule.domains):
            if schedule.weights[:, k].max() > 0 and not any(W[:, i].max() > 0 for i in range(len(data))
                                                             if plan.prefix_domains[i] == dom):
                raise ValueError(f"--data-path: domain '{dom}' has a scheduled weight but no prefix of it has a "
                                 f"training sample of --seq-length {seq_length}+1 tokens with a positive weight; "
                                 "add data, lower --seq-length or schedule it at 0")
        positions = schedule.positions_in_samples(seq_length)
        # the index depends only on the knots, the weights and N; names and sizes make the cache key readable
        identity = [f"{os.path.basename(p)}:{int(n)}" for p, n in zip(plan.prefixes, epoch_lens)]
        index = build_or_load(positions, W, int(train_samples), os.path.join(cache, "mixture"), identity)
        chains = [EpochChain(d, int(c)) if c > 0 else _Empty() for d, c in zip(data, index.counts)]
        train = _mixture(chains, prefix_domain_ids, index, model_vocab)
        valid: Dict[str, object] = {}
        vsets = [(d.valid(), prefix_domain_ids[i]) for i, d in enumerate(data)]
        vsets = [(ds, dom) for ds, dom in vsets if ds is not None and len(ds) > 0]
        if vsets:
            valid["all"] = exhaustive_blend([v for v, _ in vsets], [d for _, d in vsets], model_vocab)
            present = [dom for dom in plan.domains if any(plan.domains[d] == dom for _, d in vsets)]
            if len(present) > 1:
                for dom in present:
                    sub = [(v, d) for v, d in vsets if plan.domains[d] == dom]
                    valid[dom] = exhaustive_blend([v for v, _ in sub], [d for _, d in sub], model_vocab)
        for name, ds in valid.items():
            if eval_samples and len(ds) < eval_samples and _is_first_rank():
                logger.warning("validation set '%s' has %d samples, fewer than the %d one evaluation reads: "
                               "its samples repeat within an evaluation", name, len(ds), eval_samples)
        epochs = [c.num_epochs if isinstance(c, EpochChain) else 0 for c in chains]
        return schedule, index, train, valid, epochs, (positions.tolist(), W.tolist(), identity)

    schedule, index, train, valid, epochs, plan_key = _rank0_first(build)
    # same fingerprint => same sample at every global index both runs have (the index for N samples is a
    # prefix of the index for more), whatever --train-iters is; store it with checkpoints to catch changes
    fingerprint = hashlib.md5(repr((plan_key, int(args.seed), seq_length, data_cfg.split)).encode(),
                              usedforsecurity=False).hexdigest()
    bundle = DataBundle(
        vocab_size=plan.tokenizer.vocab_size if plan.tokenizer else None,
        eod_id=plan.tokenizer.eod if plan.tokenizer else None,
        domains=list(plan.domains), valid_domains=list(valid), seq_length=seq_length,
        train_samples=int(train_samples), fingerprint=fingerprint, schedule=schedule,
        prefix_domain_ids=prefix_domain_ids, epochs_per_prefix=epochs,
        _train=train, _valid=valid, _index=index,
        _layout=(mbs, int(dp_rank), int(dp_size), data_cfg.num_workers), packed=data_cfg.packed,
    )
    if _is_first_rank():
        logger.info("data: %d prefixes in domains %s; %d train samples (index %s, built in %.2fs); epochs per "
                    "prefix %s; validation sets %s", len(plan.prefixes), plan.domains, train_samples,
                    index.cache_path, index.build_seconds, epochs, list(valid))
    return bundle


class _Empty:
    num_epochs = 0

    def __len__(self):
        return 0

    def __getitem__(self, k):
        raise IndexError(k)


def _mixture(chains, domain_ids, index, vocab_size=None):
    from .datasets import MixtureDataset

    return MixtureDataset(chains, domain_ids, index.dataset_index, index.dataset_sample_index, vocab_size)
