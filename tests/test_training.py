"""End-to-end training behaviour on CPU: learning, resume, resharding, logs and checkpoints."""

import json
import os

import pytest

from launcher import TINY, train


def test_tiny_preset_learns_on_mock_data(tmp_path):
    recs = train(1, ["--model", "tri-tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "4",
                     "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "3", "--train-iters", "40",
                     "--tensorboard-dir", str(tmp_path / "tb"), "--save", str(tmp_path / "ckpt")],
                 str(tmp_path / "log.jsonl"))
    first = sum(r["lm_loss"] for r in recs[:3]) / 3
    last = sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert first > 6.5  # ~log(1024) at the start
    assert last < first - 1.0, (first, last)
    for key in ("iteration", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_sec", "tflops_per_device", "mfu"):
        assert key in recs[0]
    assert recs[-1]["tokens_per_sec"] > 0 and recs[-1]["tflops_per_device"] > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read().strip() == "40"


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]],
                         ids=["single", "tp2-distopt"])
def test_resume_gives_identical_losses(tmp_path, layout):
    nproc = 2 if layout else 1
    flags = TINY + ["--mtp-num-layers", "1", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2"] + layout
    straight = train(nproc, [*flags, "--train-iters", "6"], str(tmp_path / "straight.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    first = train(nproc, [*flags, "--train-iters", "3", "--lr-decay-iters", "6", "--save", ckpt],
                  str(tmp_path / "first.jsonl"))
    second = train(nproc, [*flags, "--train-iters", "6", "--load", ckpt], str(tmp_path / "second.jsonl"))
    assert [r["iteration"] for r in second] == [4, 5, 6]
    for a, b in zip(straight, first + second):
        assert a["iteration"] == b["iteration"]
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=1e-6)
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


def test_checkpoint_from_tp2_pp2_loads_at_tp1(tmp_path):
    flags = TINY + ["--mtp-num-layers", "1"]
    ckpt = str(tmp_path / "ckpt")
    train(4, [*flags, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--train-iters", "2", "--save", ckpt], str(tmp_path / "a.jsonl"))
    cont_tp2pp2 = train(4, [*flags, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                            "--train-iters", "4", "--load", ckpt], str(tmp_path / "b.jsonl"))
    cont_tp1 = train(1, [*flags, "--train-iters", "4", "--load", ckpt], str(tmp_path / "c.jsonl"))
    assert [r["iteration"] for r in cont_tp1] == [3, 4]
    for a, b in zip(cont_tp2pp2, cont_tp1):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-5
        assert abs(a["mtp_loss"] - b["mtp_loss"]) <= 1e-5


def test_interrupted_save_leaves_previous_checkpoint_latest(tmp_path):
    from tri_megatron.training.checkpointing import find_latest_checkpoint

    ckpt = tmp_path / "ckpt"
    train(1, [*TINY, "--train-iters", "2", "--save", str(ckpt)], str(tmp_path / "a.jsonl"))
    # what a crash in the middle of writing iteration 4 leaves behind
    partial = ckpt / "iter_0000004.tmp-save"
    partial.mkdir()
    (partial / "common.pt").write_bytes(b"\0" * 10)
    assert find_latest_checkpoint(str(ckpt)) == str(ckpt / "iter_0000002")
    recs = train(1, [*TINY, "--train-iters", "3", "--load", str(ckpt)], str(tmp_path / "b.jsonl"))
    assert [r["iteration"] for r in recs] == [3]
    meta = json.load(open(ckpt / "iter_0000002" / "tri_meta.json"))
    assert meta["iteration"] == 2 and meta["consumed_samples"] == 16


def test_bf16_matches_fp32_closely(tmp_path):
    init = str(tmp_path / "init")
    train(1, [*TINY, "--train-iters", "0", "--save", init, "--no-save-optim"], str(tmp_path / "i.jsonl"))
    fp32 = train(1, [*TINY, "--train-iters", "2", "--load", init], str(tmp_path / "a.jsonl"))
    bf16 = train(1, [*TINY, "--bf16", "--train-iters", "2", "--load", init], str(tmp_path / "b.jsonl"))
    for a, b in zip(fp32, bf16):
        assert abs(a["lm_loss"] - b["lm_loss"]) < 0.02  # bf16 rounding, same weights and data
        assert a["lm_loss"] != b["lm_loss"]  # it really ran in bf16
