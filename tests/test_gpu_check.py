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
    assert list(stages) == ["kernels", "tests", "train", "bench", "mfu"]
    for name in ("kernels", "tests", "bench", "mfu"):
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
    assert list(stages) == ["kernels", "tests", "train", "bench", "mfu"]  # all reached
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
