"""Test-only hooks: faults that the test suite injects into real training runs. Never use them in a real run.

Every hook is off unless a test switches it on, and each does nothing else when off. They exist so
that tests (tests/test_fault.py, tests/test_robustness.py, tests/test_slurm.py) can drive a launched
``pretrain_tri.py`` into states that are otherwise hard to reach on demand:

* ``--inject-nan-at-iter K [K ...]`` (declared by ``add_flags``; ``RunConfig.inject_nan_at_iter``):
  the model output of iteration K is multiplied by NaN on every rank, so the loss and every gradient
  of that step are NaN (the non-finite policy's input). Hook points: ``poison_iteration`` in the
  training step, ``poison`` on the forward output.
* ``TRI_TEST_ITER_SLEEP_S=SECONDS``: sleep after every iteration, so that a test's signal lands
  mid-run. Hook point: ``iteration_sleep`` after each iteration is logged.
* ``TRI_TEST_PAUSE_IN_SAVE=ITER:SECONDS``: when saving iteration ITER, once this rank has written its
  files into the temporary directory (before the barrier and the rename), write ``pause-rank<R>.pid``
  (its pid) there and sleep up to SECONDS (60 if not given; less if an exit signal arrives), so that a
  test can SIGKILL it mid-save. Hook point: ``pause_in_save`` before a checkpoint is committed.
* ``TRI_TEST_PAUSE_IN_SHARD_WRITE=ITER:SECONDS``: the process writing this rank's shards of ITER's
  checkpoint (with --async-save, the background writer) writes ``writer-rank<R>.pid`` into the temporary
  directory and sleeps SECONDS (60 if not given) before writing, so that a test can see training go on
  while the save is pending, and crash it then. Hook point: ``wrap_shard_writer``.
* ``TRI_TEST_START_DELAY=RANK:SECONDS``: RANK sleeps SECONDS before it reads its command line, as a rank
  that is still importing does on a loaded node. Hook point: ``start_delay`` in ``pretrain_tri.py``.
* ``TRI_TEST_DISK_FULL_IN_SAVE=ITER[:RANK]``: the shard writer of RANK (every rank if not given) writes a
  few KiB of its first shard file and then fails as a full disk does: it reports
  ``OSError(ENOSPC)`` to megatron-core the way megatron's own writer processes report theirs. Hook point:
  ``wrap_shard_writer``.

This module imports nothing from the package (the argument parser imports it; the save passes in its
exit-signal check).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Iterable

ITER_SLEEP_ENV = "TRI_TEST_ITER_SLEEP_S"
PAUSE_IN_SAVE_ENV = "TRI_TEST_PAUSE_IN_SAVE"
PAUSE_IN_SHARD_WRITE_ENV = "TRI_TEST_PAUSE_IN_SHARD_WRITE"
DISK_FULL_ENV = "TRI_TEST_DISK_FULL_IN_SAVE"
START_DELAY_ENV = "TRI_TEST_START_DELAY"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Declare the test-hook flags."""
    g = parser.add_argument_group("test hooks (tests only; tri_megatron/test_hooks.py)")
    g.add_argument("--inject-nan-at-iter", type=int, nargs="+", default=[], metavar="ITER",
                   help="test hook: make the loss (and so every gradient) NaN at these iterations")


# ------------------------------------------------------------------ --inject-nan-at-iter
def poison_iteration(iteration: int, inject_nan_at_iter: Iterable[int]) -> bool:
    """Whether the step computing ``iteration`` (1-based) is to have its output poisoned."""
    return iteration in inject_nan_at_iter


def poison(output):
    """The forward output times NaN: every loss and gradient of the step becomes NaN."""
    return output * float("nan")


# ------------------------------------------------------------------ environment hooks
def iteration_sleep() -> None:
    """TRI_TEST_ITER_SLEEP_S: slow every iteration down."""
    s = os.environ.get(ITER_SLEEP_ENV)
    if s:
        time.sleep(float(s))


def start_delay(rank: int) -> None:
    """TRI_TEST_START_DELAY=RANK:SECONDS: this rank starts late."""
    spec = os.environ.get(START_DELAY_ENV)
    if spec and int(spec.partition(":")[0]) == rank:
        time.sleep(float(spec.partition(":")[2]))


def pause_in_save(tmp_dir: str, iteration: int, rank: int, interrupted: Callable[[], object]) -> None:
    """TRI_TEST_PAUSE_IN_SAVE=ITER:SECONDS: stall inside the save of ITER, files written, before the rename,
    until SECONDS pass or ``interrupted()`` (the run's exit-signal check) turns true."""
    spec = os.environ.get(PAUSE_IN_SAVE_ENV)
    if not spec:
        return
    it, _, seconds = spec.partition(":")
    if int(it) != iteration:
        return
    with open(os.path.join(tmp_dir, f"pause-rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + float(seconds or 60)
    while time.time() < deadline and not interrupted():
        time.sleep(0.05)


def wrap_shard_writer(write, tmp_dir: str, iteration: int):
    """``write``: megatron-core's shard writer of one save, called as write(rank, write_buckets,
    results_queue) (in the background with --async-save). Returned unchanged unless
    TRI_TEST_PAUSE_IN_SHARD_WRITE or TRI_TEST_DISK_FULL_IN_SAVE name this iteration."""
    pause = os.environ.get(PAUSE_IN_SHARD_WRITE_ENV, "")
    full = os.environ.get(DISK_FULL_ENV, "")
    pause_it, _, pause_s = pause.partition(":")
    full_it, _, full_rank = full.partition(":")
    if str(iteration) not in (pause_it, full_it):
        return write

    def hooked(rank, write_buckets, results_queue, *args, **kwargs):
        if pause_it == str(iteration):
            with open(os.path.join(tmp_dir, f"writer-rank{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(float(pause_s or 60))
        if full_it == str(iteration) and full_rank in ("", str(rank)):
            import errno

            first_file = write_buckets[0][0]
            with open(first_file, "wb") as f:  # what a full disk leaves: the start of a shard
                f.write(b"\0" * 4096)
            results_queue.put(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), first_file))
            return None
        return write(rank, write_buckets, results_queue, *args, **kwargs)

    return hooked
