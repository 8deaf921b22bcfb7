"""tests/fork_server.py (through tests/launcher.py) runs pretrain_tri.py as torchrun does: the same records,
the same lines, the exit code of a failing rank, and a run that outlives its timeout is stopped whole.

These tests use the fork server whatever TRI_TEST_FORK_SERVER says (it chooses the launch path of the
rest of the suite), so they test it under TRI_TEST_FORK_SERVER=0 as well."""

import os
import subprocess

import psutil
import pytest

import launcher
from launcher import TINY, train


@pytest.fixture(autouse=True)
def fork_server_on(monkeypatch):
    monkeypatch.setenv("TRI_TEST_FORK_SERVER", "1")


def test_forked_run_matches_torchrun(tmp_path, monkeypatch):
    args = [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "3"]
    log = str(tmp_path / "forked.jsonl")
    assert launcher.run(2, [*args, "--log-json", log]).args[0] == "(fork server)"
    forked = launcher.records(log)
    monkeypatch.setenv("TRI_TEST_FORK_SERVER", "0")
    torchrun = train(2, args, str(tmp_path / "torchrun.jsonl"))
    assert len(forked) == 3
    for a, b in zip(forked, torchrun):
        assert (a["iteration"], a["lm_loss"], a["grad_norm"]) == (b["iteration"], b["lm_loss"], b["grad_norm"])


def test_forked_run_reports_its_output_and_failure():
    env = launcher.run(2, [*TINY, "--train-iters", "1"]).stdout
    assert "tri_megatron: layout TP=1 PP=1 VPP=1 CP=1 DP=2" in env
    with pytest.raises(AssertionError, match=r"\(fork server\).* exited 2\n(.|\n)*--not-a-flag"):
        launcher.run(2, [*TINY, "--not-a-flag"])


def test_forked_run_past_its_timeout_is_stopped(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        launcher.run(2, [*TINY, "--train-iters", "100000"], timeout=5)
    assert not psutil.Process(launcher._SERVER.pid).children(recursive=True)  # leader and ranks are gone
    again = train(1, [*TINY, "--train-iters", "1"], str(tmp_path / "after.jsonl"))  # the server still serves
    assert [r["iteration"] for r in again] == [1]


def test_torchrun_run_past_its_timeout_is_stopped(tmp_path, monkeypatch):
    """The other launch path: torchrun starts each rank in a session of its own, so the ranks are killed
    along with it, not left training."""
    monkeypatch.setenv("TRI_TEST_FORK_SERVER", "0")
    log = str(tmp_path / "torchrun-timeout.jsonl")
    with pytest.raises(subprocess.TimeoutExpired):
        launcher.run(2, [*TINY, "--train-iters", "100000", "--log-json", log], timeout=40)
    assert os.path.exists(log)  # the ranks were training when the timeout came
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if log in (p.info["cmdline"] or [])]
    assert not left
