"""DataBundle behaviour: resume at iteration k, DP sharding, epochs without repeats, validation, masks."""
import os

import numpy as np
import pytest
import torch

from test_data_common import (bin_dir, corpus_dir, data_args, tokenizer_dir, unique_data,  # noqa: F401
                              write_schedule)

SCHEDULE = """
unit: tokens
knots:
  - {at: 0, weights: {alpha: 0.6, beta: 0.2, gamma: 0.2}}
  - {at: 20000, weights: {alpha: 0.2, beta: 0.3, gamma: 0.5}}
"""


def _args(unique_data, tmp_path, **kw):
    sched = write_schedule(tmp_path / "s.yaml", SCHEDULE)
    prefixes = [unique_data["prefixes"][d] for d in ("alpha", "beta", "gamma")]
    base = dict(seq_length=16, micro_batch_size=2, data_mixture_schedule=sched,
                data_cache_path=str(tmp_path / "cache"), split="90,10,0")
    base.update(kw)
    return data_args(prefixes, **base)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_restart_at_iteration_k_gives_the_same_samples(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    gbs, dp, mbs, steps, k = 8, 2, 2, 10, 4
    per_step = gbs // (mbs * dp)  # micro-batches per rank per iteration
    bundles = [build_data(_args(unique_data, tmp_path), dp_rank=r, dp_size=dp, train_samples=steps * gbs,
                          eval_samples=0) for r in range(dp)]
    full = [_take(b.train_iterator(0), steps * per_step) for b in bundles]
    # a fresh process after a restart: build again (cache hit) and start from consumed_samples = k * gbs
    resumed = [build_data(_args(unique_data, tmp_path), dp_rank=r, dp_size=dp, train_samples=steps * gbs,
                          eval_samples=0).train_iterator(k * gbs) for r in range(dp)]
    for r in range(dp):
        tail = list(resumed[r])
        assert len(tail) == (steps - k) * per_step
        assert _same(tail, full[r][k * per_step:])
    assert not _same(full[0][:per_step], full[0][k * per_step:(k + 1) * per_step])


def test_more_train_iters_on_resume_keeps_earlier_samples(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    short = build_data(_args(unique_data, tmp_path), dp_rank=0, dp_size=1, train_samples=200, eval_samples=0)
    long = build_data(_args(unique_data, tmp_path), dp_rank=0, dp_size=1, train_samples=2000, eval_samples=0)
    assert long.fingerprint == short.fingerprint
    a = list(short.train_iterator(100))
    assert len(a) == 50 and _same(a, _take(long.train_iterator(100), 50))


def test_dp_shards_are_disjoint_and_complete(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    n, mbs = 48, 2
    single = build_data(_args(unique_data, tmp_path, micro_batch_size=mbs * 4), dp_rank=0, dp_size=1,
                        train_samples=n, eval_samples=0)
    reference = [b for b in single.train_iterator(0)]  # each micro-batch = one chunk of mbs * dp samples
    shards = [list(build_data(_args(unique_data, tmp_path), dp_rank=r, dp_size=4, train_samples=n,
                              eval_samples=0).train_iterator(0)) for r in range(4)]
    assert [len(s) for s in shards] == [n // (mbs * 4)] * 4
    rows_seen = []
    for step, chunk in enumerate(reference):
        merged = torch.cat([shards[r][step]["tokens"] for r in range(4)])
        assert torch.equal(merged, chunk["tokens"])  # rank r holds rows [r*mbs, (r+1)*mbs) of the chunk
        rows_seen += [tuple(row.tolist()) for row in merged]
    assert len(set(rows_seen)) == n  # no sample twice across ranks and steps


def test_no_sample_repeats_within_a_domain_epoch(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    n = 2400
    bundle = build_data(_args(unique_data, tmp_path, micro_batch_size=8), dp_rank=0, dp_size=1, train_samples=n,
                        eval_samples=0)
    gamma = bundle.domains.index("gamma")
    samples = [row for b in bundle.train_iterator(0) for row, d in zip(b["tokens"], b["domain"]) if d == gamma]
    epoch_len = len(bundle._train.datasets[gamma].epochs[0])
    assert bundle.epochs_per_prefix[gamma] >= 3 and len(samples) > 2 * epoch_len
    gamma_tokens = set(np.concatenate(unique_data["docs"]["gamma"]).tolist())
    for e in range(len(samples) // epoch_len):
        epoch = torch.stack(samples[e * epoch_len:(e + 1) * epoch_len])
        flat = epoch.flatten().tolist()
        assert len(flat) == len(set(flat))  # tokens are unique: no sample (or part of one) twice in an epoch
        assert set(flat) <= gamma_tokens
    first, second = samples[:epoch_len], samples[epoch_len:2 * epoch_len]
    assert not _same([{"t": a} for a in first], [{"t": b} for b in second])  # a fresh order every epoch


def test_same_seed_same_batches_other_seed_other_batches(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    def first(seed):
        b = build_data(_args(unique_data, tmp_path, seed=seed), dp_rank=0, dp_size=1, train_samples=16,
                       eval_samples=0)
        return list(b.train_iterator(0))

    assert _same(first(1), first(1))
    assert not _same(first(1), first(2))


def test_validation_iterators(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    b = build_data(_args(unique_data, tmp_path), dp_rank=1, dp_size=2, train_samples=32, eval_samples=8)
    assert b.valid_domains == ["all", "alpha", "beta", "gamma"]
    for name in b.valid_domains:
        one, two = _take(b.valid_iterator(name), 3), _take(b.valid_iterator(name), 3)
        assert _same(one, two)  # restarts from the beginning each evaluation
        if name != "all":
            assert all((x["domain"] == b.domains.index(name)).all() for x in one)
    # validation documents are not training documents
    train_tokens = {t for batch in b.train_iterator(0) for t in batch["tokens"].flatten().tolist()}
    valid_tokens = {t for batch in _take(b.valid_iterator("all"), 20) for t in batch["tokens"].flatten().tolist()}
    assert not train_tokens & valid_tokens
    with pytest.raises(KeyError):
        b.valid_iterator("delta")


def test_batch_fields_and_eod_loss_mask(bin_dir, tokenizer_dir, tmp_path):
    from tri_megatron.data.provider import build_data

    prefixes = [os.path.join(bin_dir, f"{d}_text_document") for d in ("en", "ko")]
    for eod_mask in (False, True):
        args = data_args(prefixes, seq_length=256, micro_batch_size=3, tokenizer=tokenizer_dir,
                         data_cache_path=str(tmp_path / "cache"), eod_mask_loss=eod_mask)
        b = build_data(args, dp_rank=0, dp_size=1, train_samples=24, eval_samples=0)
        assert b.vocab_size == 700 and b.eod_id == 0
        batches = list(b.train_iterator(0))
        assert len(batches) == 8
        assert any((x["tokens"] == b.eod_id).any() for x in batches)
        for x in batches:
            assert x["tokens"].dtype == x["labels"].dtype == x["position_ids"].dtype == torch.long
            assert x["loss_mask"].dtype == torch.float32 and x["tokens"].shape == (3, 256)
            assert torch.equal(x["position_ids"], torch.arange(256).expand(3, 256))
            assert torch.equal(x["tokens"][:, 1:], x["labels"][:, :-1])
            is_eod = x["tokens"] == b.eod_id
            expected = (~is_eod).float() if eod_mask else torch.ones_like(x["loss_mask"])
            assert torch.equal(x["loss_mask"], expected)


def test_dataloader_workers_give_the_same_batches(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    out = []
    for workers in (0, 2):
        b = build_data(_args(unique_data, tmp_path, num_workers=workers), dp_rank=0, dp_size=1, train_samples=40,
                       eval_samples=0)
        out.append(list(b.train_iterator(8)))
    assert len(out[0]) == 16 and _same(out[0], out[1])


def test_too_short_data_and_consumed_past_the_end(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    args = _args(unique_data, tmp_path, seq_length=8192)  # gamma has ~6K tokens
    with pytest.raises(ValueError, match="training sample of --seq-length 8192"):
        build_data(args, dp_rank=0, dp_size=1, train_samples=10, eval_samples=0)
    b = build_data(_args(unique_data, tmp_path), dp_rank=0, dp_size=1, train_samples=10, eval_samples=0)
    with pytest.raises(ValueError, match="raise --train-iters"):
        b.train_iterator(12)
