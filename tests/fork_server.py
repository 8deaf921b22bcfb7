"""Test helper: a process that has imported torch and megatron-core once, and forks training runs from there.

Each rank of a test run used to spend about 10 s of a 2-core CI machine importing torch and megatron-core
(about half of a three-iteration run). ``tests/launcher.py`` sends the runs that must succeed here
instead: this process forks a launch leader per run (its own session, so a timeout can stop the whole
run), the leader forks one process per rank with the environment torchrun gives its workers, and each
rank runs ``pretrain_tri.py`` as ``__main__`` with its own argv, environment and working directory, its
output appended to the run's files. Nothing of tri_megatron is imported here but the stateless
``parent_death``: its modules are imported fresh in each rank (module state such as the run's start time
belongs to the run). Like torchrun, the
leader stops the other ranks when one fails (SIGTERM, then SIGKILL after 30 s).

What is not exercised here: torchrun itself and its agent's store. The runs that test launching, exit
codes, signals and errors go through torchrun (``launcher.run(..., check=False)`` and tests/test_fault.py).

Protocol: one JSON request per line on stdin ({"nproc", "script", "args", "env", "cwd", "stdout",
"stderr"}), one JSON reply per line on stdout ({"leader": pid} once started, then {"returncode": n}; or
{"unavailable": why} if the imports left more than one thread, which a fork must not copy: the launcher
then uses torchrun).
"""

import json
import os
import signal
import sys
import time

import megatron.core  # noqa: F401  the expensive imports every run repeats
import megatron.core.dist_checkpointing  # noqa: F401
import megatron.core.distributed  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.optimizer  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import numpy  # noqa: F401
import torch  # noqa: F401
import torch.distributed  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401

from tri_megatron.parent_death import die_with_parent

STOP_GRACE_S = 30.0  # torchrun's default between SIGTERM and SIGKILL


def _rank_env(request: dict, rank: int) -> dict:
    env = dict(request["env"])
    if request["nproc"] > 1:  # what torchrun --nproc_per_node N gives each worker (MASTER_* come with the request)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(request["nproc"]),
                   LOCAL_WORLD_SIZE=str(request["nproc"]), GROUP_RANK="0", ROLE_RANK=str(rank),
                   ROLE_WORLD_SIZE=str(request["nproc"]), TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0")
    return env


def _lead(request: dict) -> dict:
    """In the leader: fork the ranks, wait for them, exit with the run's code. Returns (in a rank) the
    rank's environment for ``_run_rank``."""
    pids = {}
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            return _rank_env(request, rank)
        pids[pid] = rank
    code, stop_at = 0, None
    while pids:
        if stop_at is not None and time.monotonic() > stop_at:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            stop_at = float("inf")
        pid, status = os.waitpid(-1, os.WNOHANG) if stop_at is not None else os.waitpid(-1, 0)
        if pid == 0:
            time.sleep(0.1)
            continue
        pids.pop(pid, None)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc if rc > 0 else 128 - rc  # a signal: as a shell reports it
            for other in pids:
                os.kill(other, signal.SIGTERM)
            stop_at = time.monotonic() + STOP_GRACE_S
    os._exit(code)


def serve():
    """Answer requests until stdin closes. Returns only in a rank process: (request, environment)."""
    die_with_parent(os.getppid())  # ends with its test process
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # stray prints of this process go to its stderr, never into the replies
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    for line in requests:
        request = json.loads(line)
        if threads != 1:  # a fork would copy one thread of them, and maybe a lock another one holds
            replies.write(json.dumps({"unavailable": f"{threads} threads after the imports"}) + "\n")
            replies.flush()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        leader = os.fork()
        if leader == 0:
            os.setsid()
            env = _lead(request)
            return request, env
        replies.write(json.dumps({"leader": leader}) + "\n")
        replies.flush()
        _, status = os.waitpid(leader, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    sys.exit(0)


def _run_rank(request: dict, env: dict):
    """In a rank: become ``python -u SCRIPT ARGS`` in the request's environment and working directory."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        out = os.open(request[name], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.stdout.reconfigure(write_through=True)
    sys.stderr.reconfigure(write_through=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)
    import runpy

    runpy.run_path(script, run_name="__main__")  # SystemExit ends this process as it would end the script


if __name__ == "__main__":
    _run_rank(*serve())
