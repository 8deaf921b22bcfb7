"""The console tells the story of a run (issue 16 item 3): the start banner's parameter count against the
architecture's exact count (under TP and under PP with MTP's embedding copy), consumed tokens and the
data mixture's scheduled weights in the console, --log-json and TensorBoard, per-interval memory, the
checkpoint lines, what a resume restored, the end-of-run summary, a rerun of a finished run; the
smoothed ETA on a synthetic timing sequence; the profiler's trace files per requested rank."""

import glob
import json
import os
import re

import numpy as np
import pytest

from launcher import TINY, run
from tri_megatron.config.presets import PRESETS

SEQ = 64
# Weights per domain (unit: samples): 0.9/0.1 at 0, 0.5/0.5 from 16 samples on (global batch 8).
SCHEDULE = ("unit: samples\nknots:\n - {at: 0, weights: {web: 0.9, code: 0.1}}\n"
            " - {at: 16, weights: {web: 0.5, code: 0.5}}\n")
EXPECTED_MIXTURE = {8: {"web": 0.7, "code": 0.3}, 16: {"web": 0.5, "code": 0.5}, 24: {"web": 0.5, "code": 0.5}}


def _write_domain(prefix: str, seed: int, vocab: int = 1000):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for length in rng.integers(20, 120, size=60):
        builder.add_document(rng.integers(0, vocab, size=int(length)).astype(np.int64), [int(length)])
    builder.finalize(prefix + ".idx")


def _expected_parameters(mtp: int) -> int:
    """The preset's exact count (ModelArch.num_parameters) plus the vocabulary padding rows of the
    untied embedding and output layer: what the built model holds, whatever the layout."""
    arch = PRESETS["tri-tiny"].arch.replace(mtp_num_layers=mtp)
    pad = arch.padded_vocab_size() - arch.vocab_size
    return arch.num_parameters() + 2 * pad * arch.hidden_size


def _banner(stdout: str) -> tuple:
    m = re.search(r"model tri-tiny: ([\d,]+) parameters .*?, ([\d.KMB-]+) per rank over (\d+) rank", stdout)
    assert m, stdout[-3000:]
    return int(m.group(1).replace(",", "")), m.group(2), int(m.group(3))


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """One TP=2 run on two domains with a mixture schedule, MTP, checkpoints, --log-memory, the profiler on
    both ranks; then the same command again (finished); then a resume under PP=2 one iteration further."""
    d = tmp_path_factory.mktemp("story")
    for i, name in enumerate(("web", "code")):
        _write_domain(str(d / f"{name}_text_document"), i)
    (d / "mix.yaml").write_text(SCHEDULE)
    args = [*[a for a in TINY if a != "--mock-data"], "--seq-length", str(SEQ), "--mtp-num-layers", "1",
            "--data-path", str(d / "web_text_document"), str(d / "code_text_document"),
            "--data-mixture-schedule", str(d / "mix.yaml"), "--split", "90,10,0", "--data-cache-path", str(d / "cache"),
            "--eval-interval", "3", "--eval-iters", "1", "--save", str(d / "ckpt"), "--save-interval", "2",
            "--log-json", str(d / "log.jsonl"), "--tensorboard-dir", str(d / "tb"), "--log-memory",
            "--profile", "--profile-step-start", "1", "--profile-step-end", "2", "--profile-ranks", "0", "1",
            "--profile-dir", str(d / "traces")]
    first = run(2, [*args, "--tensor-model-parallel-size", "2", "--train-iters", "3"], virtual=False)
    with open(d / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    again = run(2, [*args, "--tensor-model-parallel-size", "2", "--train-iters", "3"], virtual=False)
    with open(d / "log.jsonl") as f:
        after_again = f.read()
    resumed = run(2, [*args, "--pipeline-model-parallel-size", "2", "--train-iters", "4"], virtual=False)
    return dict(dir=d, first=first.stdout, records=records, again=again, after_again=after_again,
                resumed=resumed.stdout)


def test_banner_counts_the_built_model(story):
    total, per_rank, ranks = _banner(story["first"])  # TP=2: replicated norms count once
    assert total == _expected_parameters(mtp=1) and ranks == 2
    assert "dtype float32" in story["first"]
    assert "global batch 8 x 64 = 512 tokens per iteration" in story["first"]
    assert "layout TP=2 PP=1" in story["first"]
    total, per_rank, _ = _banner(story["resumed"])  # PP=2: MTP's embedding copy on the last stage counts once
    assert total == _expected_parameters(mtp=1)
    assert "-" in per_rank  # the two stages hold different amounts


def test_tokens_and_mixture_weights_in_json_console_and_tensorboard(story):
    train = [r for r in story["records"] if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["consumed_tokens"] == r["consumed_samples"] * SEQ == r["iteration"] * 8 * SEQ
        assert r["mixture"] == pytest.approx(EXPECTED_MIXTURE[r["consumed_samples"]], abs=1e-12)
    assert "tokens 512 |" in story["first"] and "mix web 0.700 code 0.300" in story["first"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(story["dir"] / "tb"))
    acc.Reload()
    web = {e.step: e.value for e in acc.Scalars("train/mixture/web")}
    assert web == pytest.approx({1: 0.7, 2: 0.5, 3: 0.5, 4: 0.5})  # 4: the resumed run
    assert {e.step: e.value for e in acc.Scalars("train/consumed_tokens")} == {1: 512, 2: 1024, 3: 1536, 4: 2048}


def test_memory_per_log_interval_on_cpu_is_host_memory_only(story):
    train = [r for r in story["records"] if "lm_loss" in r]
    assert all(r["host_peak_rss_gib"] > 0.05 for r in train)  # --log-memory, every iteration is logged
    assert not any("peak_mem_gib" in r for r in train)  # no CUDA: no device peak
    assert "host rss peak" in story["first"] and "peak mem" not in story["first"]


def test_checkpoint_lines_and_end_of_run_summary(story):
    out, ckpt = story["first"], str(story["dir"] / "ckpt")
    assert re.search(rf"saved checkpoint of iteration 2 to {re.escape(ckpt)}/iter_0000002 in \d+\.\ds", out)
    assert re.search(rf"saved checkpoint of iteration 3 to {re.escape(ckpt)}/iter_0000003 in \d+\.\ds", out)
    saves = [r for r in story["records"] if r.get("event") == "save"]
    assert [r["iteration"] for r in saves] == [2, 3] and all(r["seconds"] > 0 for r in saves)
    summary = out[out.index("run summary"):]
    last = [r for r in story["records"] if "lm_loss" in r][-1]
    assert "complete; iterations 0->3 (3 in this run), 1.54K tokens in this run" in summary
    assert f"final loss {last['lm_loss']:.4f}, mtp {last['mtp_loss']:.4f}" in summary
    assert "validation at iter 3:" in summary
    assert f"checkpoint: {ckpt}/iter_0000003 (iteration 3)" in summary


def test_rerun_of_a_finished_run_says_so_and_trains_nothing(story):
    proc = story["again"]
    assert proc.returncode == 0
    assert "nothing to train: the checkpoint in --save" in proc.stdout and "is at iteration 3" in proc.stdout
    assert "--train-iters is 3; the run is complete" in proc.stdout
    assert "iter " not in proc.stdout and "model tri-tiny" not in proc.stdout  # nothing built, nothing trained
    assert proc.stdout.count("nothing to train") == 1  # rank 0 only
    with open(story["dir"] / "log.jsonl") as f:
        assert sum(1 for _ in f) >= 1
    assert story["after_again"].count('"lm_loss"') == 3  # no records added by the rerun


def test_resume_says_what_it_restored(story):
    out = story["resumed"]
    assert "starting at iteration 3 (auto-resumed from --save" in out
    assert "restored iteration 3, 1.54K tokens consumed (24 samples)" in out
    assert re.search(r"iter +4/4", out) and not re.search(r"iter +[123]/", out)
    assert "run summary: complete; iterations 3->4 (1 in this run), 512 tokens in this run, 2.05K consumed" in out


def test_profiler_writes_a_trace_per_requested_rank(story):
    traces = sorted(glob.glob(str(story["dir"] / "traces" / "*.pt.trace.json")))
    assert [os.path.basename(t).split(".")[0] for t in traces] == ["rank0", "rank1"]
    for path in traces:
        with open(path) as f:
            trace = json.load(f)
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#1"}  # iteration 2 (after the warm-up step, iteration 1)
        assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])
    assert "profiler: rank 0 traced iterations 2..2" in story["first"]


def test_eta_is_the_mean_step_time_after_warm_up():
    from tri_megatron.training.console import Eta

    eta = Eta(train_iters=100, warmup=3)
    assert eta.seconds_left() is None
    for it, dt in enumerate([9.0, 5.0, 4.0], start=1):  # start-up iterations
        eta.observe(it, dt)
    assert eta.seconds_left() == pytest.approx(97 * 6.0)  # no steady iteration yet: mean of all
    lefts = []
    for it in range(4, 41):  # steady steps alternate fast and slow: the last interval's ETA would jump 3x
        eta.observe(it, 0.5 if it % 2 else 1.5)
        lefts.append(eta.seconds_left())
    assert lefts[-1] == pytest.approx(60 * (18 * 0.5 + 19 * 1.5) / 37)
    assert lefts[1] == pytest.approx(95 * 1.0)
    assert all(b <= a * 1.05 for a, b in zip(lefts[10:], lefts[11:]))  # falls steadily, no jumps


def test_logging_flags_are_checked_before_start(monkeypatch, capsys):
    import importlib.util

    from test_data_common import load_script

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    pretrain = load_script("pretrain_tri.py")
    capsys.readouterr()
    for flags, needle in ((["--wandb-project", "p"], "--wandb-project needs the wandb package"),
                          (["--profile"], "--profile needs --profile-dir DIR or --tensorboard-dir DIR"),
                          (["--profile", "--profile-dir", "x", "--profile-step-start", "3", "--profile-step-end", "3"],
                           "--profile-step-start 3 --profile-step-end 3")):
        with pytest.raises(SystemExit) as e:
            pretrain.check_before_start(["--model", "tri-tiny", "--mock-data", "--train-iters", "2", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    # Megatron-LM's flags for what we always do are accepted
    from tri_megatron.config import load_run_config

    cfg = load_run_config(["--model", "tri-tiny", "--mock-data", "--train-iters", "2", "--log-throughput",
                           "--use-pytorch-profiler", "--log-memory-to-tensorboard"], world_size=1, rank=0)
    assert cfg.logging.log_memory
