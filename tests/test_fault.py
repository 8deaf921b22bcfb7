"""Fault tolerance on CPU: exit signals agreed across ranks, exit conditions, auto-resume, NaN/inf steps,
and a rank SIGKILLed in the middle of a checkpoint save (tri_megatron/training/fault.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launcher import PRETRAIN, ROOT, TINY, dcp_tensors, free_port, run, train

FLAGS = TINY + ["--lr-warmup-iters", "3", "--lr-decay-style", "cosine"]


# ------------------------------------------------------------------------------------ helpers
def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_ID"):
        env.pop(var, None)
    return env


def _start(nproc: int, args: list, log: str, **env) -> subprocess.Popen:
    """torchrun pretrain_tri.py in the background (own session), stdout+stderr to log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), PRETRAIN, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, log: str, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started for it
        proc.wait()
        raise AssertionError(f"run did not finish in {timeout}s\n{open(log).read()[-4000:]}")


def _poll(what: str, ok, proc: subprocess.Popen, log: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ok()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}\n{open(log).read()[-4000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}\n{open(log).read()[-4000:]}")


def _records(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and "lm_loss" in line]


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """pid of torchrun's worker process with RANK=rank."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == torchrun_pid:  # field 4: the parent pid
                children.append(int(entry))
    for pid in children:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except FileNotFoundError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def _weights(ckpt_dir: str) -> dict:
    """Every floating-point tensor of a dist checkpoint (model and optimizer state), by name."""
    return {k: v for k, v in dcp_tensors(ckpt_dir).items() if v.is_floating_point()}


def _same_losses(reference: list, records: list) -> None:
    ref = {r["iteration"]: r for r in reference}
    for r in records:
        assert r["lm_loss"] == pytest.approx(ref[r["iteration"]]["lm_loss"], abs=1e-6), r["iteration"]
        assert r["lr"] == pytest.approx(ref[r["iteration"]]["lr"], rel=1e-9)


# ------------------------------------------------------------------------------------ exit signals
def test_signal_to_one_rank_stops_all_after_same_iteration_then_resumes_exactly(tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop after the same iteration, save, exit 0; the same command
    then auto-resumes from --save and the losses match an uninterrupted run's."""
    iters = 10
    flags = [*FLAGS, "--train-iters", str(iters)]
    straight = train(2, flags, str(tmp_path / "straight.jsonl"))

    ckpt, log, js = str(tmp_path / "ckpt"), str(tmp_path / "run1.log"), str(tmp_path / "run.jsonl")
    cmd = [*flags, "--save", ckpt, "--log-json", js]
    proc = _start(2, cmd, log, TRI_TEST_ITER_SLEEP_S="0.3")
    _poll("iteration 2", lambda: len(_records(js)) >= 2, proc, log)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGUSR1)
    assert _wait(proc, log) == 0, open(log).read()[-4000:]
    first = _records(js)
    stopped = first[-1]["iteration"]
    assert 2 <= stopped < iters, f"the signal landed too late (stopped at {stopped})"
    out = open(log).read()
    assert "rank 1 got SIGUSR1" in out and "rank 0 got" not in out
    assert f"stopping after iteration {stopped}: SIGUSR1" in out
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped)

    proc = _start(2, cmd, str(tmp_path / "run2.log"))  # same command line: auto-resume
    assert _wait(proc, str(tmp_path / "run2.log")) == 0
    assert f"starting at iteration {stopped} (auto-resumed" in open(tmp_path / "run2.log").read()
    records = _records(js)
    assert [r["iteration"] for r in records] == list(range(1, iters + 1))
    _same_losses(straight, records)


def test_exit_interval_duration_and_auto_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    base = [*FLAGS, "--train-iters", "8", "--save", ckpt]
    a = train(1, [*base, "--exit-interval", "2"], str(tmp_path / "a.jsonl"))
    assert [r["iteration"] for r in a] == [1, 2]
    b = train(1, [*base, "--exit-interval", "2"], str(tmp_path / "b.jsonl"))  # auto-resumes, stops at 4
    assert [r["iteration"] for r in b] == [3, 4]
    proc = run(1, [*base, "--exit-duration-in-mins", "1e-4", "--log-json", str(tmp_path / "c.jsonl")])
    assert [r["iteration"] for r in _records(tmp_path / "c.jsonl")] == [5]
    assert "stopping after iteration 5: --exit-duration-in-mins" in proc.stdout
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "5"


# ------------------------------------------------------------------------------------ crash mid-save
def test_sigkill_during_save_leaves_previous_checkpoint_and_training_resumes(tmp_path):
    ckpt, log, js = str(tmp_path / "ckpt"), str(tmp_path / "run1.log"), str(tmp_path / "run1.jsonl")
    cmd = [*FLAGS, "--train-iters", "6", "--save", ckpt, "--save-interval", "2"]
    proc = _start(2, [*cmd, "--log-json", js], log, TRI_TEST_PAUSE_IN_SAVE="4:120")
    partial = os.path.join(ckpt, "iter_0000004.tmp-save")
    pidfile = os.path.join(partial, "pause-rank0.pid")
    _poll("the save of iteration 4", lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), proc, log)
    # the helper of each rank that writes: megatron's writer sends its results through a spawned manager's queue
    helpers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert helpers
    os.kill(int(open(pidfile).read()), signal.SIGKILL)  # rank 0: the one that would rename it into place
    assert _wait(proc, log, timeout=120) != 0
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert not alive, "helper processes outlived their SIGKILLed trainer (tri_megatron/parent_death.py)"
    killed = _records(js)
    assert [r["iteration"] for r in killed] == [1, 2, 3, 4]

    from tri_megatron.training.checkpointing import find_latest_checkpoint

    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(ckpt, "iter_0000004"))
    assert find_latest_checkpoint(ckpt) == os.path.join(ckpt, "iter_0000002")

    resumed = train(2, [*cmd, "--train-iters", "5"], str(tmp_path / "run2.jsonl"))  # auto-resume from --save
    assert [r["iteration"] for r in resumed] == [3, 4, 5]
    _same_losses(killed, resumed[:2])  # iterations 3 and 4 replay exactly from the iteration-2 checkpoint
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "5"
    assert not os.path.exists(partial)  # the next save cleared the debris


# ------------------------------------------------------------------------------------ non-finite steps
def test_nan_step_is_skipped_and_leaves_weights_unchanged(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    recs = train(2, [*FLAGS, "--use-distributed-optimizer", "--train-iters", "4", "--inject-nan-at-iter", "3",
                     "--save", ckpt, "--save-interval", "1"], str(tmp_path / "log.jsonl"))
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    bad = recs[2]
    assert bad["skipped"] and set(bad["nonfinite"]) == {"lm_loss", "grad"} and math.isnan(bad["lm_loss"])
    assert bad["grad_norm"] is None
    assert all(not r["skipped"] and "nonfinite" not in r and math.isfinite(r["lm_loss"]) for r in recs[:2] + recs[3:])
    assert recs[3]["lr"] == recs[2]["lr"] > recs[1]["lr"]  # warm-up did not advance over the skipped step
    w2, w3, w4 = (_weights(os.path.join(ckpt, f"iter_000000{i}")) for i in (2, 3, 4))
    assert any(k.startswith("optimizer.") for k in w2) and any(not k.startswith("optimizer.") for k in w2)
    for k in w2:  # weights and Adam moments untouched by iteration 3
        assert w2[k].equal(w3[k]), k
    assert any(not w3[k].equal(w4[k]) for k in w3)  # iteration 4 trained again
    assert all(v.isfinite().all() for v in w4.values())


def test_nan_step_stops_the_run_when_asked(tmp_path):
    ckpt = tmp_path / "ckpt"
    js = tmp_path / "log.jsonl"
    proc = run(1, [*FLAGS, "--train-iters", "5", "--inject-nan-at-iter", "2", "--on-nonfinite", "stop",
                   "--save", str(ckpt), "--save-interval", "1", "--log-json", str(js)], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    recs = _records(js)
    assert [r["iteration"] for r in recs] == [1, 2] and recs[1]["nonfinite"] == ["lm_loss", "grad"]
    assert "iteration 2: non-finite lm_loss, grad" in proc.stdout and "stopping" in proc.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# ------------------------------------------------------------------------------------ in-process units
def test_signal_handler_records_first_signal():
    from tri_megatron.training.fault import ExitSignalHandler, parse_signals

    assert parse_signals("SIGTERM,usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("none") == [] and parse_signals("") == []
    for bad in ("SIGKILL", "SIGNOPE"):
        with pytest.raises(ValueError):
            parse_signals(bad)
    h = ExitSignalHandler([signal.SIGUSR2]).install()
    try:
        assert h.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert h.received == signal.SIGUSR2
    finally:
        h.restore()


_TEARDOWN_SCRIPT = r"""
import re, sys, time
import torch.distributed as dist
from tri_megatron.training import distributed

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
if sys.argv[1] == "hang":
    def hang():  # as torch 2.6's gloo destructor did: block with the GIL held (exponential backtracking)
        re.fullmatch("(a+)+b", "a" * 64)
    dist.destroy_process_group = hang
distributed.destroy_distributed(timeout_s=2)
time.sleep(3)  # a teardown that returned leaves no timer behind
print("returned", flush=True)
"""


def test_a_hung_process_group_teardown_ends_the_process():
    """destroy_distributed ends a process whose teardown hangs (even holding the GIL) after its timeout,
    with exit code 1 and the stacks on stderr, instead of holding the job to its time limit."""
    for mode, rc in (("hang", 1), ("normal", 0)):
        t0 = time.time()
        res = subprocess.run([sys.executable, "-c", _TEARDOWN_SCRIPT % free_port(), mode], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == rc, (mode, res.stdout[-2000:], res.stderr[-3000:])
        if mode == "hang":
            assert time.time() - t0 < 60 and "returned" not in res.stdout
            assert "Timeout" in res.stderr and "destroy_distributed" in res.stderr, res.stderr[-3000:]
        else:
            assert "returned" in res.stdout and "Timeout" not in res.stderr


def test_exit_conditions_and_nonfinite_policy():
    import torch

    from tri_megatron.config.fault import FaultConfig
    from tri_megatron.training import fault

    now = [100.0]
    cfg = FaultConfig(exit_interval=3, exit_duration_in_mins=1.0, exit_signals=())
    cond = fault.ExitConditions(cfg, start_time=100.0, clock=lambda: now[0])
    assert cond.check(1) is None and cond.check(3)[0] == "interval"
    now[0] = 161.0
    assert cond.check(4)[0] == "duration"

    policy = fault.NonfinitePolicy(FaultConfig(on_nonfinite="skip", max_nonfinite_skips=2))
    assert [policy.observe(b) for b in (["grad"], [], ["lm_loss"], ["grad"])] == ["skip", "ok", "skip", "stop"]
    assert fault.NonfinitePolicy(FaultConfig(on_nonfinite="stop", max_nonfinite_skips=0)).observe(["grad"]) == "stop"
    assert fault.nonfinite_fields(1.0, None, 0) == [] and fault.nonfinite_fields(float("inf"), 2.0, 1) == ["lm_loss", "grad"]

    m = torch.nn.Linear(3, 2)
    m(torch.ones(1, 3)).sum().backward()
    assert fault.count_nonfinite_grads([m]) == 0
    m.weight.grad[0, 0] = float("inf")
    assert fault.count_nonfinite_grads([m]) == 1
    m.weight.main_grad = torch.zeros(2, 3)  # megatron DDP's gradient buffer wins over .grad
    assert fault.count_nonfinite_grads([m]) == 0


def test_launch_env_reads_torchrun_and_slurm_through_one_path():
    from tri_megatron.launcher import first_slurm_host, launch_env

    slurm = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
             "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    e = launch_env(slurm)
    assert (e["launcher"], e["rank"], e["world_size"], e["local_rank"], e["node_rank"], e["local_world_size"]) == \
        ("slurm", 11, 16, 3, 1, 8)
    assert e["master_addr"] == "gpu007" and e["master_port"] == str(20000 + 4242)
    e = launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "6000"})
    assert (e["master_addr"], e["master_port"]) == ("head", "6000")
    # torchrun inside an srun task: torchrun's variables win
    e = launch_env({**slurm, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "GROUP_RANK": "0",
                    "LOCAL_WORLD_SIZE": "8"})
    assert (e["launcher"], e["rank"], e["local_rank"], e["node_rank"]) == ("torchrun", 5, 5, 0)
    assert launch_env({})["world_size"] == 1
    assert first_slurm_host("n[3-4,9],m1") == "n3" and first_slurm_host("r[1-2]-g[05-06]") == "r1-g05"


def test_fault_flags_are_validated():
    from tri_megatron.config import ArgumentError, load_run_config

    for extra, match in ((["--exit-signals", "SIGKILL"], "cannot be caught"),
                         (["--exit-interval", "0"], "--exit-interval 0"),
                         (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins"),
                         (["--max-nonfinite-skips", "-1"], "--max-nonfinite-skips"),
                         (["--slurm-requeue"], "--slurm-requeue needs --save")):
        with pytest.raises(ArgumentError, match=match):
            load_run_config([*TINY, *extra], world_size=1, rank=0)
