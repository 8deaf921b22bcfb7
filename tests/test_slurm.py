"""Launch and preemption under a real SLURM (Debian's slurm-wlm + munge, one node on localhost).

tests/slurm/localslurm.py starts munged, slurmctld and slurmd under a temporary directory; the job
(tests/slurm/tiny_train.sbatch) runs the tiny preset on 2 CPU processes through the production
examples/slurm/launch.sh. The test preempts it with `scancel --signal=USR1`, and checks that it
saved, requeued itself (`--slurm-requeue`), resumed from the checkpoint, and that the per-iteration
losses equal an uninterrupted torchrun run's.

On CI (CI=true) these tests never skip: missing SLURM packages are installed with
tests/slurm/install.sh and a failure to do so fails the test. Elsewhere they skip when SLURM is not
installed or we are not root.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from launcher import ROOT, TINY, free_port, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm"))
from localslurm import LocalSlurm, missing_requirements  # noqa: E402

JOB_SCRIPT = os.path.join(ROOT, "tests", "slurm", "tiny_train.sbatch")
FLAGS = TINY + ["--lr-warmup-iters", "3", "--lr-decay-style", "cosine"]
ITERS = 12


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_slurm() -> None:
    why = missing_requirements()
    if why and _on_ci() and os.geteuid() == 0:
        subprocess.run(["bash", os.path.join(ROOT, "tests", "slurm", "install.sh")], timeout=900)
        why = missing_requirements()
    if why:
        if _on_ci():
            pytest.fail(f"SLURM is required on CI but {why}")
        pytest.skip(f"no local SLURM: {why}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_slurm()
    c = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: torchrun, 2 processes, same flags."""
    return train(2, [*FLAGS, "--train-iters", str(ITERS)], str(tmp_path_factory.mktemp("ref") / "ref.jsonl"))


def _records(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and "lm_loss" in line]


def _poll(what: str, ok, cluster, job: int, out: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ok()
        if got:
            return got
        state = cluster.job(job).get("JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            break
        time.sleep(0.1)
    log = open(out).read()[-5000:] if os.path.exists(out) else "(no job output)"
    raise AssertionError(f"waiting for {what}: job {job} is {cluster.job(job)}\n--- job output\n{log}\n{cluster.logs()}")


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preempted_job_saves_requeues_and_resumes_exactly(cluster, reference, launcher, tmp_path):
    ckpt, js, out = str(tmp_path / "ckpt"), str(tmp_path / "train.jsonl"), str(tmp_path / "job.out")
    args = [*FLAGS, "--train-iters", str(ITERS), "--save", ckpt, "--log-json", js, "--slurm-requeue"]
    env = cluster.env(dict(os.environ, TRI_DIR=ROOT, TINY_ARGS=" ".join(args), LAUNCHER=launcher,
                           NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
                           PYTHONWARNINGS="ignore", TRI_TEST_ITER_SLEEP_S="0.3"))
    try:  # launch.sh takes the rendezvous host from `scontrol show hostnames`; fall back if it does not resolve
        socket.gethostbyname(cluster.host)
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"
    job = cluster.sbatch(JOB_SCRIPT, f"--output={out}", env=env)

    _poll("iteration 2 of the first run", lambda: len(_records(js)) >= 2, cluster, job, out, timeout=240)
    cluster.run(["scancel", "--signal=USR1", str(job)])  # what a preemption notice does to the job's tasks
    info = _poll("the job to requeue itself", lambda: (lambda i: i if i.get("Restarts") == "1" and
                                                       i.get("JobState") == "PENDING" else None)(cluster.job(job)),
                 cluster, job, out, timeout=120)
    assert info["Requeue"] == "1"
    # SLURM holds a requeued job ~2 minutes (Reason=BeginTime); let it go now
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = _poll("the requeued job to complete", lambda: (lambda i: i if i.get("JobState") == "COMPLETED" else None)(
        cluster.job(job)), cluster, job, out, timeout=240)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info

    log = open(out).read()
    records = _records(js)
    stops = [line for line in log.splitlines() if "stopping after iteration" in line]
    assert len(stops) == 1 and ": SIGUSR1; checkpoint saved" in stops[0], log[-4000:]
    stopped = int(stops[0].split("stopping after iteration ")[1].split(":")[0])
    assert 2 <= stopped < ITERS, f"the signal landed too late (stopped at {stopped})"
    assert "rank 0 got SIGUSR1" in log and "rank 1 got SIGUSR1" in log
    assert f"requeueing SLURM job {job}" in log
    assert "(restart 1)" in log and f"starting at iteration {stopped} (auto-resumed from --save" in log
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))  # each iteration exactly once
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(ITERS)
    ref = {r["iteration"]: r for r in reference}
    for r in records:
        assert r["lm_loss"] == pytest.approx(ref[r["iteration"]]["lm_loss"], abs=1e-6), r["iteration"]
        assert r["lr"] == pytest.approx(ref[r["iteration"]]["lr"], rel=1e-9)


# ------------------------------------------------------------------------------ the production scripts
def _dry_run(script: str, nodes: int, **extra) -> list:
    env = dict(os.environ, TRI_DRY_RUN="1", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="77", SLURM_NTASKS=str(8 * nodes),
               SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NUM_NODES=str(nodes), SLURM_CPUS_PER_TASK="12",
               MASTER_ADDR="node001", DATA_PATH="0.7 /data/web_text_document 0.3 /data/code_text_document",
               TOKENIZER="/data/tokenizer", **extra)
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _without(words: list, flags: tuple) -> list:
    out, skipping = [], False
    for w in words:
        if w.startswith("--"):
            skipping = w in flags
        if not skipping:
            out.append(w)
    return out


@pytest.mark.parametrize("script,nodes,extra", [("tri-7b.sbatch", 64, {}), ("tri-21b.sbatch", 64, {}),
                                                ("tri-70b.sbatch", 64, {}),
                                                ("tri-70b.sbatch", 250, {"GLOBAL_BATCH_SIZE": "1000"})])
def test_sbatch_scripts_launch_valid_layouts(script, nodes, extra):
    from tri_megatron.config import load_run_config

    words = _dry_run(script, nodes, **extra)
    assert words[:2] == ["srun", f"--ntasks={8 * nodes}"]
    train_args = words[words.index("pretrain_tri.py") + 1:]
    assert "--slurm-requeue" in train_args and "--save" in train_args
    # validate the layout for the full world size, with mock data standing in for the files
    from tri_megatron.config import build_parser
    from tri_megatron.config.config_file import expand

    assert "--config" in train_args  # model, layout and schedule come from examples/configs/
    flat = expand(build_parser(), train_args)  # the file's flags, then the script's (which override them)
    check = _without(flat, ("--data-path", "--tokenizer", "--data-cache-path", "--split")) + ["--mock-data"]
    cfg = load_run_config(check, world_size=8 * nodes, rank=0, check_disk=False)
    par = cfg.parallel
    dp = 8 * nodes // (par.tp * par.pp * par.cp)
    assert par.dp == dp and par.tp <= 8  # TP stays inside a node
    assert par.sequence_parallel  # all three scripts run TP with sequence parallelism

    words = _dry_run(script, nodes, LAUNCHER="torchrun", **extra)
    assert words[:4] == ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in words and "--nproc-per-node=8" in words
    assert words[words.index("pretrain_tri.py") + 1:] == train_args
