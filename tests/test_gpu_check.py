"""tools/gpu_check.py on this CPU machine: it runs, writes its JSON, says which GPU stages it skipped and
why, trains on the CPU, and a stage that fails (raises, or runs past its timeout) does not stop the
stages after it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from launcher import ROOT

TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def test_cpu_run_reports_skipped_gpu_stages_and_trains(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    report_path = tmp_path / "report.json"
    res = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path), "--json", str(report_path),
                          "--features", "ssmax"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["kernels", "tests", "train", "bench", "mfu", "mtp"]
    for name in ("kernels", "tests", "bench", "mfu", "mtp"):
        assert stages[name]["status"] == "skipped" and "no CUDA device" in stages[name]["summary"]
    train = stages["train"]
    assert train["status"] == "ok", train
    run = train["results"]["ssmax"]
    assert run["status"] == "ok" and run["iterations"] == 2 and len(run["losses"]) == 2
    assert os.path.isfile(tmp_path / "train_ssmax.log")
    assert "| (c) tri-tiny bf16 per feature set | ok |" in res.stdout  # the short table
    assert report["facts"]["cuda_device"] is None and report["facts"]["megatron_core"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_failing_and_timed_out_stages_do_not_stop_the_rest(tmp_path, monkeypatch):
    gc = _load_tool()
    real_facts = gc.gather_facts
    monkeypatch.setattr(gc, "gather_facts", lambda args: dict(real_facts(args), cuda_device=None))

    def broken(ctx):
        raise RuntimeError("kernel probe broke")

    monkeypatch.setitem(gc.STAGE_FUNCS, "kernels", broken)
    report = gc.main(["--out", str(tmp_path), "--features", "ssmax,distopt", "--timeout", "train=3"])
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["kernels", "tests", "train", "bench", "mfu", "mtp"]  # all reached
    assert stages["kernels"]["status"] == "failed" and "kernel probe broke" in stages["kernels"]["summary"]
    train = stages["train"]
    assert train["status"] == "failed" and train["seconds"] < 30  # killed at its 3 s timeout, not run to the end
    assert {r["status"] for r in train["results"].values()} == {"timeout"}
    assert stages["bench"]["status"] == "skipped" and stages["mfu"]["status"] == "skipped"
    assert report["ok"] is False
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"][0]["status"] == "failed"


@pytest.mark.parametrize("bad", [["--stages", "kernels,nope"], ["--features", "ssmax,fp9"],
                                 ["--timeout", "train=-1"], ["--wheels", "/nonexistent-wheels"]])
def test_bad_flags_exit_2(bad, capsys):
    gc = _load_tool()
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(bad)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("gpu_check.py: --")


def test_gpu_stages_read_what_their_tools_write(tmp_path, monkeypatch):
    """No GPU here, so the GPU stages are run as if there were one, on the same tools at CPU sizes
    (bench_kernels at 1/32 scale, bench_mfu's proxy of tri-tiny): their reports must be read back,
    and a GPU test run where every cuda case skipped, or kernels that did not load, is a failure."""
    gc = _load_tool()
    real_facts = gc.gather_facts
    monkeypatch.setattr(gc, "gather_facts", lambda args: dict(
        real_facts(args), cuda_device={"name": "pretend", "capability": "9.0", "count": 1, "memory_gib": 80}))
    monkeypatch.setattr(gc, "BENCH_ARGS", ["--tp", "8", "--mtp", "1", "--grad-mode", "ddp", "--scale", "32",
                                           "--iters", "1", "--warmup", "0"])
    monkeypatch.setattr(gc, "MFU_ARGS", ["--model", "tri-tiny", "--proxy-gpus", "8", "--tensor-model-parallel-size",
                                         "2", "--micro-batch-size", "1", "--global-batch-size", "8", "--warmup", "1",
                                         "--iters", "1", "--breakdown-iters", "0", "--peak-tflops", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = gc.main(["--out", str(tmp_path), "--stages", "kernels,tests,bench,mfu,mtp"])
    stages = {s["name"]: s for s in report["stages"]}
    kernels = stages["kernels"]
    assert kernels["status"] == "failed" and "kernels not loaded" in kernels["summary"], kernels
    assert "torch" in kernels["summary"]  # says why: CPU torch, no device
    tests = stages["tests"]
    assert tests["status"] == "failed" and tests["results"].get("passed", 0) == 0 and tests["results"]["skipped"] > 0, tests
    bench = stages["bench"]
    assert bench["status"] == "ok", bench
    (loss,) = bench["results"]["loss"]
    assert loss["tp"] == 8 and loss["time_ratio"] > 0 and 0 < loss["mem_ratio"]
    assert {r["case"] for r in bench["results"]["rope"]} >= {"rope", "rope+ssmax"}
    mfu = stages["mfu"]
    assert mfu["status"] == "ok", mfu
    assert 0 < mfu["results"]["mfu"] and mfu["results"]["step_time_s"] > 0 and mfu["results"]["peak_memory_gib"] > 0
    mtp = stages["mtp"]  # the same proxy with one MTP layer, against the mfu stage's step
    assert mtp["status"] == "ok", mtp
    assert mtp["results"]["step_time_s_no_mtp"] == mfu["results"]["step_time_s"]
    assert mtp["results"]["mtp_share"] == pytest.approx(1 - mfu["results"]["step_time_s"] / mtp["results"]["step_time_s"])
