"""Checkpoint settings: where a run saves and what it loads, how often, and auto-resume; flags, the
resolution of ``--load`` against the disk, and checks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    no_save_optim: bool = False
    exit_on_missing_checkpoint: bool = False
    auto_resume: bool = False
    """--load was not given and --save already holds a complete checkpoint, which the run continues."""

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("checkpointing")
        g.add_argument("--save", default=None)
        g.add_argument("--load", default=None)
        g.add_argument("--save-interval", type=int, default=0)
        g.add_argument("--no-save-optim", action="store_true")
        g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                       help="exit 2 when --load holds no checkpoint (default: --load X --save X on an empty X starts "
                            "from scratch with a warning, as Megatron)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CheckpointConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "auto_resume"]
        return cls(**{n: getattr(ns, n) for n in names})

    def validate(self) -> None:
        if self.save_interval and not self.save:
            raise ArgumentError("--save-interval needs --save DIR")
        if self.save_interval < 0:
            raise ArgumentError(f"--save-interval {self.save_interval}: must be >= 0")

    def resolved(self, rank: int = 0) -> "CheckpointConfig":
        """What the run loads, decided from the disk: a --save directory that already holds a complete
        checkpoint is loaded when --load is not given (auto-resume, so a requeued job restarts with the same
        command line); ``--save X --load X`` on an empty X starts afresh with a warning (as Megatron);
        any other --load without a checkpoint is an ArgumentError."""
        from tri_megatron.training.checkpointing import find_latest_checkpoint

        load, auto = self.load, False
        if load is None and self.save and find_latest_checkpoint(self.save) is not None:
            load, auto = self.save, True
        if load is not None and find_latest_checkpoint(load) is None:
            same = bool(self.save) and os.path.realpath(load) == os.path.realpath(self.save)
            if not same or self.exit_on_missing_checkpoint:
                raise ArgumentError(f"--load {load}: no complete checkpoint there; check the path or drop --load"
                                    + (" (--exit-on-missing-checkpoint)" if same else ""))
            if rank == 0:
                print(f"pretrain_tri.py: warning: --load {load}: no checkpoint yet; starting from scratch "
                      f"(--exit-on-missing-checkpoint to stop instead)", file=sys.stderr, flush=True)
            load = None
        return dataclasses.replace(self, load=load, auto_resume=auto)
