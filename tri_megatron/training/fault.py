"""Fault tolerance: exit signals, exit conditions, the non-finite loss/gradient policy, SLURM requeue.

At thousands of GPUs, preemption and bad steps are routine; this module makes them boring.

* **Exit signals** (``--exit-signals``, default SIGTERM and SIGUSR1, what SLURM sends before a time
  limit or preemption, e.g. ``#SBATCH --signal=B:USR1@120``, and SIGINT, Ctrl-C): the handler only
  records the signal (a second SIGINT aborts at once, without saving: KeyboardInterrupt).
  After every iteration all ranks agree (one all-reduce of two numbers) whether *any* rank got
  one, or whether ``--exit-duration-in-mins`` has passed on any rank, so every rank stops after
  the same iteration; the loop then saves a checkpoint and the process exits 0. With
  ``--slurm-requeue``, rank 0 then runs ``scontrol requeue $SLURM_JOB_ID``; the requeued job starts
  the same command, which resumes from the newest complete checkpoint in ``--save``.
  ``--exit-interval N`` stops (after saving) when the iteration is a multiple of N; it is not
  requeued.
* **Non-finite loss or gradients**: before the optimizer step, the loss (already summed over all
  ranks) and every gradient are checked; the count of non-finite gradient tensors rides in the
  same all-reduce as the loss, so all ranks decide alike. A bad step is logged with its iteration
  (``"nonfinite": [...]`` in the --log-json record, a console line) and, with
  ``--on-nonfinite skip`` (default), not applied: weights, optimizer moments and the learning-rate
  schedule stay as they were, the batch counts as consumed. ``--on-nonfinite stop`` (or
  ``--max-nonfinite-skips`` consecutive bad steps) stops the run without saving, exit code 3.
  The gradient norm is non-finite exactly when some gradient element is, except if finite
  gradients (|g| ~ 1e19) overflow the fp32 norm: that is caught from the norm the optimizer
  returns, after its step, and reported the same way (``"nonfinite": ["grad_norm"]``).

The faults tests inject (``--inject-nan-at-iter``, ``TRI_TEST_*``) live in tri_megatron/test_hooks.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from tri_megatron.config.fault import DEFAULT_EXIT_SIGNALS, FaultConfig, parse_signals  # noqa: F401 (re-exported)

EXIT_NONFINITE = 3  # process exit code when the run stops on a non-finite loss or gradient
_START_TIME = time.time()  # process start, for --exit-duration-in-mins (as Megatron)


# ---------------------------------------------------------------------------------- signals
class ExitSignalHandler:
    """Records the first of the given signals; the training loop acts on it between iterations."""

    def __init__(self, signals: list, rank: int | None = None):
        self.signals = list(signals)
        self.received: signal.Signals | None = None
        self.rank = rank
        self._previous = {}

    def install(self) -> "ExitSignalHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now
            os.write(2, b"tri_megatron: second SIGINT: aborting without saving\n")
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)
            who = f"rank {self.rank}" if self.rank is not None else f"pid {os.getpid()}"
            # os.write: no buffered-IO re-entrancy trouble inside a signal handler
            os.write(2, f"tri_megatron: {who} got {self.received.name}: will save a checkpoint and exit "
                        f"after the current iteration\n".encode())

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


_HANDLER: ExitSignalHandler | None = None


def install_exit_signal_handler(cfg: FaultConfig, rank: int | None = None) -> ExitSignalHandler:
    """Install the process-wide handler for --exit-signals (idempotent) and start inductor's compile
    worker out of Ctrl-C's reach (``start_compile_workers``); return the handler."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = ExitSignalHandler(list(cfg.exit_signals), rank).install()
        start_compile_workers()
    elif rank is not None:
        _HANDLER.rank = rank
    return _HANDLER


@contextlib.contextmanager
def sigint_blocked():
    """SIGINT blocked in this thread and in every process started meanwhile (a signal mask is inherited
    through fork and exec). One sent to this process meanwhile is not lost: another thread takes it (the
    handler runs in the main thread as usual), or it stays pending until the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_compile_workers() -> None:
    """Start torch inductor's compile-worker process now, with SIGINT blocked (``sigint_blocked``).

    Ctrl-C in a terminal signals the whole foreground process group. Inductor's worker process ignores
    SIGINT only once it has set itself up: seconds where triton is installed (it hashes triton's
    library first), so a Ctrl-C in the first iteration made it print a KeyboardInterrupt traceback
    next to the clean save (every time under torch 2.6). This starts what torch itself would start at
    its first compile (nothing without triton, with ``TORCH_WARM_POOL=0`` or one compile thread):
    torch 2.6 does it when ``torch._inductor.async_compile`` is first imported (megatron-core's import
    does), later torch in ``maybe_warm_pool`` at its first compile. Call it before megatron-core is
    imported."""
    with sigint_blocked():
        from torch._inductor import async_compile

        warm = getattr(async_compile, "maybe_warm_pool", None)
        if warm is not None:
            warm()


def signal_received() -> signal.Signals | None:
    return _HANDLER.received if _HANDLER is not None else None


# ---------------------------------------------------------------------------------- exit conditions
class ExitConditions:
    """Decides, identically on every rank, whether to stop after an iteration.

    ``check(iteration)`` returns None or (reason, detail) with reason in {"signal", "duration",
    "interval"}. Signals and the wall-clock limit are local facts, so they are agreed with one
    MAX all-reduce of two numbers over the whole world (any rank -> all ranks); the interval is
    the same everywhere without communication.
    """

    def __init__(self, cfg: FaultConfig, start_time: float | None = None, clock=time.time):
        self.exit_interval = cfg.exit_interval
        mins = cfg.exit_duration_in_mins
        self.exit_seconds = mins * 60.0 if mins else None
        self.start_time = _START_TIME if start_time is None else start_time
        self.clock = clock
        self.watch_signals = bool(cfg.exit_signals)

    def _agree(self, local: list) -> list:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def check(self, iteration: int):
        if self.watch_signals or self.exit_seconds:
            sig = signal_received()
            over = self.exit_seconds is not None and self.clock() - self.start_time > self.exit_seconds
            signum, over = self._agree([float(sig.value) if sig else 0.0, 1.0 if over else 0.0])
            if signum:
                return "signal", signal.Signals(int(signum)).name
            if over:
                return "duration", f"--exit-duration-in-mins {self.exit_seconds / 60:g} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return "interval", f"--exit-interval {self.exit_interval} reached"
        return None


# ---------------------------------------------------------------------------------- non-finite steps
@torch.no_grad()
def count_nonfinite_grads(model_chunks: list) -> float:
    """How many of this rank's gradient tensors hold a NaN or inf (megatron DDP's main_grad, else .grad).

    One fused reduction per tensor and a single host sync. After the schedule has reduced the
    gradients over data parallel ranks, a non-finite value anywhere shows up on some rank.
    """
    from tri_megatron.mcore_internals import main_grad

    flags = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = main_grad(p)
            if g is None:
                g = p.grad
            if g is not None and g.numel():
                flags.append(torch.isfinite(g).all().logical_not())
    if not flags:
        return 0.0
    return float(torch.stack(flags).sum().item())


def nonfinite_fields(lm_loss, mtp_loss, nonfinite_grads: float) -> list:
    """Names of what is non-finite in a step (empty when the step is healthy)."""
    bad = []
    if lm_loss is not None and not math.isfinite(lm_loss):
        bad.append("lm_loss")
    if mtp_loss is not None and not math.isfinite(mtp_loss):
        bad.append("mtp_loss")
    if nonfinite_grads:
        bad.append("grad")
    return bad


class NonfinitePolicy:
    """--on-nonfinite skip|stop and --max-nonfinite-skips (consecutive)."""

    def __init__(self, cfg: FaultConfig):
        self.mode = cfg.on_nonfinite
        self.max_skips = cfg.max_nonfinite_skips or 0
        self.streak = 0
        self.total = 0

    def observe(self, bad: list) -> str:
        """'ok', 'skip' or 'stop' for a step whose non-finite fields are ``bad``."""
        if not bad:
            self.streak = 0
            return "ok"
        self.streak += 1
        self.total += 1
        if self.mode == "stop" or (self.max_skips and self.streak >= self.max_skips):
            return "stop"
        return "skip"


# ---------------------------------------------------------------------------------- SLURM
def requeue_slurm_job(job_id: str | None = None, timeout: float = 60) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``: the job goes back to pending and reruns its batch script.

    Call it last (after the checkpoint is complete and the process group is gone): SLURM ends the
    running job's processes as part of the requeue. SLURM holds a requeued job for about two
    minutes (Reason=BeginTime) before it is eligible again.
    """
    job_id = job_id or os.environ.get("SLURM_JOB_ID")  # for an array task, its own job id
    if not job_id:
        print("tri_megatron: --slurm-requeue: not inside a SLURM job (no SLURM_JOB_ID); not requeued", file=sys.stderr)
        return False
    cmd = ["scontrol", "requeue", str(job_id)]
    print(f"tri_megatron: requeueing SLURM job {job_id}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"tri_megatron: {' '.join(cmd)} failed: {e}", file=sys.stderr, flush=True)
        return False
    if proc.returncode != 0:
        print(f"tri_megatron: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}", file=sys.stderr,
              flush=True)
        return False
    return True
