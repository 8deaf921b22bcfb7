"""Dynamic mixture: the C++ index follows the schedule; schedule validation errors; index cache."""
import os

import numpy as np
import pytest

from test_data_common import data_args, unique_data, write_schedule  # noqa: F401


def reference_index(positions, weights, n):
    """The greedy rule written plainly: running sum of interpolated weights, pick the largest deficit."""
    k = weights.shape[1]
    target, counts, out = np.zeros(k), np.zeros(k, dtype=np.int64), np.empty(n, dtype=np.int64)
    for i in range(n):
        target += [np.interp(i, positions, weights[:, d]) for d in range(k)]
        d = int(np.argmax(target - counts))
        out[i] = d
        counts[d] += 1
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpp_index_matches_reference_and_tracks_targets(seed):
    from tri_megatron.data.mixture_index import compute_mixture_index

    rng = np.random.default_rng(seed)
    k, m, n = 4, 4, 6000
    positions = np.sort(rng.uniform(0, n, size=m))
    positions[0] = 0.0 if seed == 0 else positions[0]  # seed 0: first knot at 0; others: constant before it
    weights = rng.dirichlet(np.ones(k), size=m)
    di, dsi, counts = compute_mixture_index(positions, weights, n)
    ref = reference_index(positions, weights, n)
    assert np.array_equal(di.astype(np.int64), ref)
    assert np.array_equal(counts, np.bincount(ref, minlength=k))
    onehot = np.eye(k)[ref]
    # dataset_sample_index counts previous draws from the same dataset: 0, 1, 2, ... per dataset
    assert np.array_equal(dsi, (np.cumsum(onehot, axis=0) - 1)[np.arange(n), ref].astype(dsi.dtype))
    w = np.stack([np.interp(np.arange(n), positions, weights[:, d]) for d in range(k)], axis=1)
    deficit = np.cumsum(w, axis=0) - np.cumsum(onehot, axis=0)
    assert np.abs(deficit).max() < 1.0 + 1e-9


SCHEDULE = """
unit: tokens
knots:
  - at: 0
    weights: {alpha: 0.8, beta: 0.1, gamma: 0.1}
  - at: 32K
    weights: {alpha: 0.4, beta: 0.3, gamma: 0.3}
  - at: 64000
    weights: {alpha: 0.2, beta: 0.3, gamma: 0.5}
"""


def test_realised_token_share_follows_schedule_around_knots(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    seq, mbs, n = 32, 4, 3000
    sched = write_schedule(tmp_path / "s.yaml", SCHEDULE)
    names = ["alpha", "beta", "gamma"]
    args = data_args([unique_data["prefixes"][d] for d in names], seq_length=seq, micro_batch_size=mbs,
                     data_mixture_schedule=sched, data_cache_path=str(tmp_path / "cache"), split="100,0,0")
    bundle = build_data(args, dp_rank=0, dp_size=1, train_samples=n, eval_samples=0)
    assert bundle.domains == names
    tokens_per_domain = np.zeros((n, 3))
    i = 0
    for batch in bundle.train_iterator(0):
        for row in range(mbs):
            tokens_per_domain[i, int(batch["domain"][row])] = batch["loss_mask"][row].sum().item()
            i += 1
    assert i == n
    knots_samples = np.array([0, 32_000, 64_000]) / seq
    knot_w = np.array([[0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.2, 0.3, 0.5]])
    scheduled = np.stack([np.interp(np.arange(n), knots_samples, knot_w[:, d]) for d in range(3)], axis=1)
    half = 200
    for knot in knots_samples:
        lo, hi = int(max(0, knot - half)), int(min(n, knot + half))
        realised = tokens_per_domain[lo:hi].sum(0) / tokens_per_domain[lo:hi].sum()
        expected = scheduled[lo:hi].mean(0)
        assert np.abs(realised - expected).max() < 0.01, (knot, realised, expected)
    # the gamma domain is small: it runs through several epochs
    assert bundle.epochs_per_prefix[2] > 2


def test_tokens_and_samples_units_agree(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    seq = 16
    by_tokens = write_schedule(tmp_path / "t.yaml", "unit: tokens\nknots:\n - {at: 0, weights: {alpha: 1.0}}\n"
                                                    " - {at: 8000, weights: {alpha: 0.5, beta: 0.5}}\n")
    by_samples = write_schedule(tmp_path / "s.yaml", "unit: samples\nknots:\n - {at: 0, weights: {alpha: 1.0}}\n"
                                                     " - {at: 500, weights: {alpha: 0.5, beta: 0.5}}\n")
    prefixes = [unique_data["prefixes"]["alpha"], unique_data["prefixes"]["beta"]]
    out = []
    for sched in (by_tokens, by_samples):
        args = data_args(prefixes, seq_length=seq, data_mixture_schedule=sched, data_cache_path=str(tmp_path / "c"))
        b = build_data(args, dp_rank=0, dp_size=1, train_samples=800, eval_samples=0)
        out.append(np.asarray(b._index.dataset_index))
        assert b.realised_shares(0, 100)["alpha"] > 0.9 and abs(b.realised_shares(600, 800)["beta"] - 0.5) < 0.02
    assert np.array_equal(out[0], out[1])


def test_domain_groups_and_within_domain_weights(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    sched = write_schedule(tmp_path / "g.yaml", "domains:\n  ab: [alpha, beta]\nknots:\n"
                                                " - {at: 0, weights: {ab: 0.6, gamma: 0.4}}\n")
    p = unique_data["prefixes"]
    args = data_args(["3", p["alpha"], "1", p["beta"], "1", p["gamma"]], seq_length=16,
                     data_mixture_schedule=sched, data_cache_path=str(tmp_path / "c"))
    b = build_data(args, dp_rank=0, dp_size=1, train_samples=2000, eval_samples=0)
    assert b.domains == ["ab", "gamma"]
    counts = np.bincount(np.asarray(b._index.dataset_index), minlength=3) / 2000
    assert np.allclose(counts, [0.45, 0.15, 0.4], atol=0.002)
    assert b.realised_shares(0, 2000) == pytest.approx({"ab": 0.6, "gamma": 0.4}, abs=0.002)


def test_static_blend_without_schedule(unique_data, tmp_path):
    from tri_megatron.data.provider import build_data

    p = unique_data["prefixes"]
    args = data_args(["0.25", p["alpha"], "0.75", p["gamma"]], seq_length=16, data_cache_path=str(tmp_path / "c"))
    b = build_data(args, dp_rank=0, dp_size=1, train_samples=1000, eval_samples=0)
    assert b.domains == ["alpha", "gamma"]
    assert b.realised_shares(0, 1000) == pytest.approx({"alpha": 0.25, "gamma": 0.75}, abs=0.002)


BAD = {
    "sum": ("knots:\n - {at: 0, weights: {alpha: 0.5, beta: 0.4}}\n", "weights sum to 0.9, they must sum to 1"),
    "unknown": ("knots:\n - {at: 0, weights: {alpha: 0.5, beta: 0.3, delta: 0.2}}\n",
                "domain(s) delta not found in --data-path"),
    "uncovered": ("knots:\n - {at: 0, weights: {alpha: 1.0}}\n", "(domain 'beta') is not in the schedule"),
    "order": ("knots:\n - {at: 1T, weights: {alpha: 1.0, beta: 0}}\n - {at: 2B, weights: {alpha: 1.0}}\n",
              "positions strictly increase"),
    "negative": ("knots:\n - {at: 0, weights: {alpha: 1.5, beta: -0.5}}\n", "must be a number >= 0"),
    "yaml": ("knots: [ {at: 0\n", "not valid YAML"),
    "unit": ("unit: steps\nknots:\n - {at: 0, weights: {alpha: 1.0, beta: 0}}\n", "unit must be"),
    "position": ("knots:\n - {at: soon, weights: {alpha: 1.0, beta: 0}}\n", "is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_schedule_gives_one_clear_error(unique_data, tmp_path, case):
    from tri_megatron.data.provider import validate_data_args

    text, needle = BAD[case]
    sched = write_schedule(tmp_path / "bad.yaml", text)
    p = unique_data["prefixes"]
    with pytest.raises(ValueError) as err:
        validate_data_args(data_args([p["alpha"], p["beta"]], data_mixture_schedule=sched))
    msg = str(err.value)
    assert msg.startswith("--data-mixture-schedule") and needle in msg and "\n" not in msg


def test_missing_schedule_and_missing_data_path(unique_data, tmp_path):
    from tri_megatron.data.provider import validate_data_args

    with pytest.raises(ValueError, match="file not found"):
        validate_data_args(data_args([unique_data["prefixes"]["alpha"]],
                                     data_mixture_schedule=str(tmp_path / "nope.yaml")))
    with pytest.raises(ValueError, match="^--data-path: no data given"):
        validate_data_args(data_args([]))


def test_index_is_cached_and_keyed_by_schedule(unique_data, tmp_path):
    from tri_megatron.data.mixture_index import build_or_load

    positions, weights = np.array([0.0, 100.0]), np.array([[0.5, 0.5], [0.1, 0.9]])
    first = build_or_load(positions, weights, 5000, str(tmp_path), ["a", "b"])
    again = build_or_load(positions, weights, 5000, str(tmp_path), ["a", "b"])
    assert again.build_seconds == 0.0 and again.cache_path == first.cache_path
    assert np.array_equal(first.dataset_index, again.dataset_index)
    assert np.array_equal(first.dataset_sample_index, again.dataset_sample_index)
    other = build_or_load(positions, np.array([[0.5, 0.5], [0.2, 0.8]]), 5000, str(tmp_path), ["a", "b"])
    assert other.cache_path != first.cache_path
    assert not any(".tmp" in f for f in os.listdir(tmp_path))


def test_a_longer_run_keeps_the_same_order():
    """Raising --train-iters on resume must not change the samples already planned."""
    from tri_megatron.data.mixture_index import compute_mixture_index

    rng = np.random.default_rng(7)
    positions = np.array([0.0, 1234.5, 4000.25, 9000.0])
    weights = rng.dirichlet(np.ones(5), size=4)
    short = compute_mixture_index(positions, weights, 3001)  # ends mid-ramp
    long = compute_mixture_index(positions, weights, 12000)
    assert np.array_equal(short[0], long[0][:3001]) and np.array_equal(short[1], long[1][:3001])
