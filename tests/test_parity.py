"""Parallel layouts give the loss and gradients of TP=PP=DP=1 on the same weights and data.

Every layout starts from one initial checkpoint written at TP=PP=DP=1 (so this also exercises
resharding on load) and trains three iterations; iteration 2 and 3 losses depend on the updated
weights, so equal losses there also mean equal gradients, and the gradient norm is compared too.
"""

import os

import pytest

from launcher import TINY, train

FEATURES = {
    "base": [],
    "mtp": ["--mtp-num-layers", "1"],
    "ssmax_irope": ["--ssmax", "--no-rope-freq", "4"],
    "mtp2": ["--mtp-num-layers", "2"],
    "tri70b_style": ["--no-rope-freq", "4", "--window-size", "16", "--window-attn-skip-freq", "4",
                     "--attn-temperature-tuning", "--attn-floor-scale", "8", "--attn-scale", "0.5"],
}

LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["--use-distributed-optimizer"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "tp2_sp_pp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--pipeline-model-parallel-size", "2"]),
    "tp2_sp_dp2_distopt": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--use-distributed-optimizer", "--overlap-grad-reduce"]),
}

# Every layout runs at least once. The MTP runs compare the main loss too, so a layout that runs with MTP
# runs without it only where nothing else covers that: the plain output layer under PP, TP + SP + PP and DP.
CASES = [
    *[("base", layout) for layout in ("pp2", "dp2", "tp2_sp_pp2", "tp2_sp_dp2_distopt")],
    ("mtp", "tp2"), ("mtp", "tp2_sp"), ("mtp", "pp2_vpp2"), ("mtp", "dp2_distopt"), ("mtp", "tp2_pp2"),
    ("ssmax_irope", "tp2"), ("ssmax_irope", "tp2_sp"), ("ssmax_irope", "pp2"), ("ssmax_irope", "tp2_pp2"),
    ("tri70b_style", "tp2_pp2"), ("tri70b_style", "tp2_sp_pp2"),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per feature set: the initial checkpoint and the TP=PP=DP=1 run from it."""
    cache = {}

    def get(feature):
        if feature not in cache:
            root = tmp_path_factory.mktemp(feature)
            init = str(root / "init")
            flags = TINY + FEATURES[feature]
            train(1, [*flags, "--train-iters", "0", "--save", init, "--no-save-optim"], str(root / "init.jsonl"))
            ref = train(1, [*flags, "--train-iters", "3", "--load", init], str(root / "ref.jsonl"))
            cache[feature] = (init, flags, ref, root)
        return cache[feature]

    return get


@pytest.mark.parametrize("feature,layout", CASES, ids=[f"{f}-{l}" for f, l in CASES])
def test_layout_matches_single_process(references, feature, layout):
    init, flags, ref, root = references(feature)
    nproc, layout_flags = LAYOUTS[layout]
    got = train(nproc, [*flags, *layout_flags, "--train-iters", "3", "--load", init],
                str(root / f"{layout}.jsonl"))
    assert len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        assert abs(r["lm_loss"] - g["lm_loss"]) <= 1e-5, (r["iteration"], r["lm_loss"], g["lm_loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4, abs=1e-6)
        if "--mtp-num-layers" in flags:  # reported (megatron-core's MTP tracker is read through mcore_internals)
            assert r["mtp_loss"] is not None and g["mtp_loss"] is not None, "MTP loss missing from --log-json"
            assert abs(r["mtp_loss"] - g["mtp_loss"]) <= 1e-5
        else:
            assert r["mtp_loss"] is None and g["mtp_loss"] is None
    # the run really learned something: weights moved between iterations
    assert len({round(r["lm_loss"], 6) for r in got}) > 1


FUSED_LAYOUTS = {"single": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]),
                 "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
                 "tp2_sp": LAYOUTS["tp2_sp"], "pp2_vpp2": LAYOUTS["pp2_vpp2"],
                 "dp2_distopt": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"])}


@pytest.mark.parametrize("layout", sorted(FUSED_LAYOUTS))
def test_fused_mtp_loss_matches_unfused_path(references, layout):
    """--fused-mtp-loss (main + 2 MTP heads in one chunked op) gives the stock output-layer + CE losses."""
    init, flags, ref, root = references("mtp2")
    nproc, layout_flags = FUSED_LAYOUTS[layout]
    got = train(nproc, [*flags, *layout_flags, "--fused-loss", "--train-iters", "3", "--load", init],
                str(root / f"fused-{layout}.jsonl"))
    for r, g in zip(ref, got):
        assert abs(r["lm_loss"] - g["lm_loss"]) <= 1e-5
        assert abs(r["mtp_loss"] - g["mtp_loss"]) <= 1e-5
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4, abs=1e-6)


def test_every_layout_runs():
    assert {layout for _, layout in CASES} == set(LAYOUTS)
