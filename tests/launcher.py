"""Test helper: run pretrain_tri.py under torchrun on CPU and read back its --log-json records.

The runs inherit TRI_VIRTUAL_DEVICE (tests/conftest.py sets it to 1 unless given): ``--device auto``
then trains on the virtual accelerator. ``virtual=True/False`` forces one or the other for a run.

A run that must succeed (``check=True``, so every ``train``) is forked from ``tests/fork_server.py``, a
process of this test process that has imported torch and megatron-core already, with the environment
torchrun gives its workers: that saves each rank about 10 s of imports. The others (a run expected to
fail, whose exit code and error lines the test reads) go through torchrun, as do a run whose environment
differs from the test process's in a variable read only as a process starts (``_startup``: a PYTHONPATH,
say) and every run with TRI_TEST_FORK_SERVER=0 (tests/test_fork_server.py sets it to 1).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from tri_megatron.local_dist import free_port  # noqa: F401 (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "pretrain_tri.py")
FORK_SERVER = os.path.join(ROOT, "tests", "fork_server.py")

# The tiny preset cut further so that a 4-process run takes seconds on 2 cores.
TINY = ["--model", "tri-tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1"]


def run(nproc: int, args: list, check: bool = True, timeout: int = 600, virtual=None,
        extra_env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    if virtual is not None:
        env["TRI_VIRTUAL_DEVICE"] = "1" if virtual else "0"
    env.update(extra_env or {})
    port = str(free_port())
    if nproc == 1:
        cmd = [sys.executable, PRETRAIN, *args]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port, PRETRAIN, *args]
    proc = None
    if check and os.environ.get("TRI_TEST_FORK_SERVER", "1") != "0" and _UNAVAILABLE is None \
            and _startup(env) == _startup(_server_env()):  # the server's, once started (it is restarted if not)
        proc = _forked(nproc, args, dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port), timeout)
        if proc is not None:
            cmd = ["(fork server)", *cmd]
    if proc is None:
        proc = _launched(cmd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _launched(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(cmd), except that past the timeout (or on an interrupt) the ranks are killed along
    with torchrun: torchrun starts each in a session of its own, and killing torchrun alone leaves them."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        try:
            tree = psutil.Process(proc.pid)
            tree = [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


_SERVER = None  # tests/fork_server.py, started on first use, one per test process
_SERVER_STARTUP = None  # its startup variables (_startup)
_UNAVAILABLE = None  # why the fork server cannot fork (then runs go through torchrun)


def _server_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _startup(env: dict) -> dict:
    """The variables read as a process starts (the interpreter's, the thread pools' and the loader's): a
    forked rank has its server's, so a run that sets others (a PYTHONPATH, say) goes through torchrun."""
    return {k: v for k, v in env.items() if k.startswith(("PYTHON", "OMP_", "MKL_", "LD_", "MALLOC"))}


def _server() -> subprocess.Popen:
    """The fork server, started (again) if it has not the startup variables a run would have now."""
    global _SERVER, _SERVER_STARTUP
    if _SERVER is not None and _SERVER_STARTUP != _startup(_server_env()):
        _SERVER.stdin.close()  # it ends once its stdin closes
        _SERVER.wait()
        _SERVER = None
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER_STARTUP = _startup(_server_env())
        _SERVER = subprocess.Popen([sys.executable, FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, cwd=ROOT, env=_server_env())
    return _SERVER


def _reply(server: subprocess.Popen, deadline: float):
    """The server's next reply, or None at the deadline."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([server.stdout], [], [], left)[0]:
        return None
    line = server.stdout.readline()
    if not line:
        raise AssertionError(f"tests/fork_server.py ended (exit code {server.wait()})")
    return json.loads(line)


def _forked(nproc: int, args: list, env: dict, timeout: float):
    """``pretrain_tri.py ARGS`` on nproc ranks forked by the fork server; output captured as subprocess.run's.
    None if the server cannot fork (its imports started threads)."""
    global _UNAVAILABLE
    server = _server()
    with tempfile.TemporaryDirectory(prefix="tri-forked-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        request = {"nproc": nproc, "script": PRETRAIN, "args": list(args), "env": env, "cwd": ROOT,
                   "stdout": out, "stderr": err}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        deadline = time.monotonic() + timeout + 120  # the first request also waits for the server's imports
        started = _reply(server, deadline)
        if started is None:
            raise AssertionError("tests/fork_server.py did not start the run")
        if "unavailable" in started:
            _UNAVAILABLE = started["unavailable"]
            print(f"tests/launcher.py: the fork server cannot fork ({_UNAVAILABLE}); runs use torchrun",
                  file=sys.stderr)
            return None
        leader = started["leader"]
        done = _reply(server, time.monotonic() + timeout)
        if done is None:  # stop the whole run (the leader's session), then collect its exit
            os.killpg(leader, signal.SIGKILL)
            _reply(server, time.monotonic() + 60)
        read = lambda path: open(path).read() if os.path.exists(path) else ""  # noqa: E731
        if done is None:
            raise subprocess.TimeoutExpired(["(fork server)", PRETRAIN, *args], timeout, read(out), read(err))
        return subprocess.CompletedProcess(["(fork server)", PRETRAIN, *args], done["returncode"], read(out), read(err))


def train(nproc: int, args: list, log_json: str, **kw) -> list:
    """Run and return the per-iteration training records (evaluation records dropped)."""
    if os.path.exists(log_json):
        os.remove(log_json)
    run(nproc, [*args, "--log-json", log_json], **kw)
    return records(log_json)


def records(log_json: str) -> list:
    """The per-iteration training records of a --log-json file (evaluation records dropped)."""
    with open(log_json) as f:
        return [r for r in map(json.loads, f) if "lm_loss" in r]


def dcp_tensors(path: str) -> dict:
    """Every tensor of a distributed checkpoint directory (model and optimizer state), by key, read in
    this process with torch.distributed.checkpoint."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tri_megatron.convert.dcp_local import load_local

    md = FileSystemReader(path).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata)}
    load_local(sd, FileSystemReader(path), None)
    return sd
