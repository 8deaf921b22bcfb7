"""Fault-tolerance settings: exit signals, time and iteration limits, SLURM requeue and the policy for
non-finite losses and gradients (acted on by ``tri_megatron.training.fault``); flags and checks."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from typing import Optional, Tuple

from tri_megatron.config.errors import ArgumentError

DEFAULT_EXIT_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"


def parse_signals(text: Optional[str]) -> list:
    """'SIGTERM,USR1' -> [Signals.SIGTERM, Signals.SIGUSR1]; '' / 'none' -> []. ValueError if bad."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    sigs = []
    for name in text.split(","):
        name = name.strip().upper()
        if not name:
            continue
        try:
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            raise ValueError(f"--exit-signals: unknown signal {name!r}; use names like SIGTERM,SIGUSR1") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--exit-signals: {sig.name} cannot be caught")
        sigs.append(sig)
    return sigs


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    exit_signals: Tuple[signal.Signals, ...] = tuple(parse_signals(DEFAULT_EXIT_SIGNALS))
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    slurm_requeue: bool = False
    on_nonfinite: str = "skip"
    max_nonfinite_skips: int = 10

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("fault tolerance (tri_megatron.training.fault)")
        g.add_argument("--exit-signals", default=DEFAULT_EXIT_SIGNALS, metavar="SIG[,SIG...]",
                       help="on any of these signals (on any rank) finish the current iteration, save and exit 0 "
                            "(SIGINT: Ctrl-C; a second one aborts without saving); "
                            "'none' to keep the default actions (default: %(default)s)")
        g.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="save and exit 0 once this many minutes have passed since the process started")
        g.add_argument("--exit-interval", type=int, default=None,
                       help="save and exit 0 when the iteration is a multiple of N")
        g.add_argument("--slurm-requeue", action="store_true",
                       help="after saving on an exit signal or --exit-duration-in-mins, rank 0 runs "
                            "`scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from --save")
        g.add_argument("--on-nonfinite", choices=["skip", "stop"], default="skip",
                       help="a NaN/inf loss or gradient: skip the update (default) or stop the run (exit 3, no save)")
        g.add_argument("--max-nonfinite-skips", type=int, default=10,
                       help="stop (exit 3) after this many consecutive skipped non-finite steps; 0 = never")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "FaultConfig":
        try:
            signals = tuple(parse_signals(ns.exit_signals))
        except ValueError as e:
            raise ArgumentError(str(e)) from None
        return cls(exit_signals=signals, exit_duration_in_mins=ns.exit_duration_in_mins,
                   exit_interval=ns.exit_interval, slurm_requeue=bool(ns.slurm_requeue),
                   on_nonfinite=ns.on_nonfinite, max_nonfinite_skips=ns.max_nonfinite_skips)

    def validate(self, save: Optional[str]) -> None:
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ArgumentError(f"--exit-interval {self.exit_interval}: must be >= 1")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ArgumentError(f"--exit-duration-in-mins {self.exit_duration_in_mins}: must be > 0")
        if self.slurm_requeue and not save:
            raise ArgumentError("--slurm-requeue needs --save DIR: the requeued job resumes from it")
        if self.max_nonfinite_skips < 0:
            raise ArgumentError(f"--max-nonfinite-skips {self.max_nonfinite_skips}: must be >= 0 (0 = never stop)")
