"""Checkpoints at scale and their faults (issue 15 items 7 and 8): --async-save (training goes on while a
checkpoint is written; a crash then leaves the previous one latest), --keep-last-n rotation, the size
check at load with its fallback to the previous intact checkpoint, and a full disk while saving."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launcher import TINY, run, train
from test_fault import _poll, _records, _start, _wait, _worker_pid

ASYNC = [*TINY, "--train-iters", "8", "--save-interval", "2", "--async-save"]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _tracker(ckpt) -> str:
    return open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip()


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory):
    """2 ranks, --async-save every 2 iterations: the background write of iteration 4 stalls (test hook);
    training goes on; rank 0 is SIGKILLed at iteration 5 or later. Then the same command resumes to
    iteration 8 with --keep-last-n 2."""
    d = tmp_path_factory.mktemp("async")
    ckpt, js, log = str(d / "ckpt"), str(d / "run1.jsonl"), str(d / "run1.log")
    proc = _start(2, [*ASYNC, "--save", ckpt, "--log-json", js], log, TRI_TEST_PAUSE_IN_SHARD_WRITE="4:120")
    pidfile = os.path.join(ckpt, "iter_0000004.tmp-save", "writer-rank0.pid")
    _poll("the background write of iteration 4", lambda: os.path.exists(pidfile) and open(pidfile).read().strip(),
          proc, log)
    writer = int(open(pidfile).read())
    _poll("iteration 5", lambda: len(_records(js)) >= 5, proc, log)
    during = {"tracker": _tracker(ckpt), "writer_alive": _alive(writer),
              "iterations": [r["iteration"] for r in _records(js)]}
    os.kill(_worker_pid(proc.pid, 0), signal.SIGKILL)
    rc = _wait(proc, log)
    time.sleep(0.5)
    after = {"rc": rc, "tracker": _tracker(ckpt), "writer_alive": _alive(writer),
             "listing": sorted(os.listdir(ckpt)), "killed": _records(js)}
    resumed = train(2, [*ASYNC, "--save", ckpt, "--keep-last-n", "2"], str(d / "run2.jsonl"))
    return {"dir": d, "ckpt": ckpt, "during": during, "after": after, "resumed": resumed}


def test_async_save_runs_in_the_background_and_a_crash_keeps_the_previous_checkpoint(async_runs):
    during, after = async_runs["during"], async_runs["after"]
    # training went on (iteration 5 logged) while iteration 4 was still being written: not yet the latest
    assert during["writer_alive"] and during["tracker"] == "2" and during["iterations"][:5] == [1, 2, 3, 4, 5]
    assert after["rc"] != 0 and after["tracker"] == "2"
    assert not after["writer_alive"]  # the background writer ended with its trainer
    assert "iter_0000004" not in after["listing"] and "iter_0000004.tmp-save" in after["listing"]
    from tri_megatron.training.checkpointing import find_latest_checkpoint

    # the resume (the same command: auto-resume) restarted from 2 and replays 3..5 exactly
    resumed = async_runs["resumed"]
    assert [r["iteration"] for r in resumed] == [3, 4, 5, 6, 7, 8]
    killed = {r["iteration"]: r for r in after["killed"]}
    for r in resumed[:3]:
        assert r["lm_loss"] == pytest.approx(killed[r["iteration"]]["lm_loss"], abs=1e-6)
    # the run waited for its last background save before exiting; --keep-last-n 2 kept the two newest
    ckpt = async_runs["ckpt"]
    assert _tracker(ckpt) == "8" and find_latest_checkpoint(ckpt) == os.path.join(ckpt, "iter_0000008")
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("iter_") and ".tmp" not in p) == \
        ["iter_0000006", "iter_0000008"]
    meta = json.load(open(os.path.join(ckpt, "iter_0000008", "tri_meta.json")))
    assert meta["files"]["metadata.json"] > 0 and any(f.endswith(".distcp") for f in meta["files"])


def test_damaged_latest_falls_back_to_the_previous_intact_checkpoint(async_runs, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(async_runs["ckpt"], ckpt)
    shard = sorted(f for f in os.listdir(os.path.join(ckpt, "iter_0000008")) if f.endswith(".distcp"))[0]
    path = os.path.join(ckpt, "iter_0000008", shard)
    with open(path, "r+b") as f:  # a truncated shard, as a crashed copy or a full disk leaves it
        f.truncate(os.path.getsize(path) // 2)
    proc = run(1, [*TINY, "--train-iters", "8", "--load", ckpt, "--log-json", str(tmp_path / "log.jsonl")],
               timeout=300)
    assert f"iter_0000008 is damaged ({shard} has" in proc.stdout and "loading" in proc.stdout
    assert f"{os.path.join(ckpt, 'iter_0000006')} instead" in proc.stdout
    recs = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lm_loss" in r]
    assert [r["iteration"] for r in recs] == [7, 8]
    for r, ref in zip(recs, async_runs["resumed"][-2:]):
        assert r["lm_loss"] == pytest.approx(ref["lm_loss"], abs=1e-5)


def test_disk_full_while_saving_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    from tri_megatron.training.checkpointing import EXIT_SAVE_FAILED, find_latest_checkpoint

    ckpt, js = tmp_path / "ckpt", tmp_path / "log.jsonl"
    proc = run(1, [*TINY, "--train-iters", "6", "--save", str(ckpt), "--save-interval", "2", "--log-json", str(js)],
               check=False, timeout=300, extra_env={"TRI_TEST_DISK_FULL_IN_SAVE": "4"})
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert ("saving the checkpoint of iteration 4" in errors[0] and "No space left on device" in errors[0]
            and "the checkpoint of iteration 2 stays the latest" in errors[0])
    assert [r["iteration"] for r in _records(js)] == [1, 2, 3, 4]  # stopped at the failed save
    assert _tracker(ckpt) == "2" and find_latest_checkpoint(str(ckpt)) == str(ckpt / "iter_0000002")
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]  # nothing half-written


# ------------------------------------------------------------------ the files of a save directory, in-process
def _fake_checkpoint(root, iteration: int, shard_bytes: int = 100) -> str:
    from tri_megatron.checkpoint_files import file_sizes, iter_dir

    path = iter_dir(str(root), iteration)
    os.makedirs(path)
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(b"x" * shard_bytes)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(path, "tri_meta.json"), "w") as f:
        json.dump({"iteration": iteration, "files": file_sizes(path)}, f)
    with open(os.path.join(str(root), "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return path


def test_find_latest_checks_recorded_sizes(tmp_path):
    from tri_megatron.checkpoint_files import find_latest_checkpoint

    paths = {it: _fake_checkpoint(tmp_path, it) for it in (2, 4, 6)}
    said = []
    assert find_latest_checkpoint(str(tmp_path), said.append) == paths[6] and not said
    with open(os.path.join(paths[6], "__0_0.distcp"), "ab") as f:
        f.write(b"more")
    os.remove(os.path.join(paths[4], "__0_0.distcp"))
    assert find_latest_checkpoint(str(tmp_path), said.append) == paths[2]
    assert said == [f"{paths[6]} is damaged (__0_0.distcp has 104 bytes, 100 recorded at save); "
                    f"{paths[4]} is damaged (__0_0.distcp is missing): loading {paths[2]} instead, the newest "
                    f"intact checkpoint"]
    os.remove(os.path.join(paths[2], "__0_0.distcp"))
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_rotation_keeps_the_newest_and_those_an_export_reads(tmp_path):
    from tri_megatron.training.checkpointing import rotate_checkpoints

    for it in (2, 4, 6, 8, 10):
        _fake_checkpoint(tmp_path, it)
    reader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()

    class Exporter:  # convert/export_hook.HFExporter's record of its background conversions
        running = [(4, reader, "iter_0000004.log"), (2, done, "iter_0000002.log")]

    try:
        removed = rotate_checkpoints(str(tmp_path), 2, 10, Exporter())
    finally:
        reader.kill()
        reader.wait()
    left = sorted(p for p in os.listdir(tmp_path) if p.startswith("iter_") and ".tmp" not in p)
    assert left == ["iter_0000004", "iter_0000008", "iter_0000010"]  # 4: still being exported
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000002", "iter_0000006"]
    assert len(rotate_checkpoints(str(tmp_path), 1, 10)) == 2  # no export running now: only the newest stays
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("iter_") and ".tmp" not in p) == ["iter_0000010"]


def test_disk_full_in_a_background_save_stops_the_run_before_the_next_save(tmp_path):
    ckpt, js = tmp_path / "ckpt", tmp_path / "log.jsonl"
    proc = run(2, [*ASYNC, "--save", str(ckpt), "--log-json", str(js)], check=False, timeout=300,
               extra_env={"TRI_TEST_DISK_FULL_IN_SAVE": "4:0"})
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain_tri.py: error:")]
    assert len(errors) == 1 and "iteration 4" in errors[0] and "No space left on device" in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout and "[rank" not in proc.stderr  # torchrun's own exit report only
    # found by the commit check after iteration 5 or at the latest by the save of 6, which waits for it
    assert [r["iteration"] for r in _records(js)][-1] in (5, 6)
    assert _tracker(ckpt) == "2" and sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
