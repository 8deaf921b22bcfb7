"""Checkpoint settings: where a run saves and what it loads, how often, asynchronously or not, how many it
keeps, and auto-resume; flags, the resolution of ``--load`` against the disk, and checks.

What to load follows Megatron: ``--no-load-optim`` keeps a fresh optimizer and learning-rate schedule
(the iteration and consumed samples are loaded), ``--no-load-rng`` keeps this run's seeded RNG, and
``--finetune`` loads the weights only (iteration and consumed samples start at 0)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from tri_megatron.config.errors import ArgumentError
from tri_megatron.checkpoint_files import find_latest_checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    no_save_optim: bool = False
    exit_on_missing_checkpoint: bool = False
    async_save: bool = False
    keep_last_n: int = 0
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
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
        g.add_argument("--async-save", action="store_true",
                       help="write checkpoints in the background (megatron-core's asynchronous torch_dist save) while "
                            "training continues; a checkpoint becomes the latest only once complete")
        g.add_argument("--keep-last-n", type=int, default=0, metavar="N",
                       help="keep only the N newest checkpoints in --save (0 = all); never deletes the newest one or "
                            "one a Hugging Face export is still reading")
        g.add_argument("--no-load-optim", action="store_true",
                       help="do not load the optimizer state nor the learning-rate schedule (as Megatron)")
        g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states (as Megatron)")
        g.add_argument("--finetune", action="store_true",
                       help="load the weights only: no optimizer, schedule or RNG state; iteration and consumed "
                            "samples start at 0 (as Megatron)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CheckpointConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "auto_resume"]
        return cls(**{n: getattr(ns, n) for n in names})

    def validate(self) -> None:
        if self.save_interval and not self.save:
            raise ArgumentError("--save-interval needs --save DIR")
        if self.save_interval < 0:
            raise ArgumentError(f"--save-interval {self.save_interval}: must be >= 0")
        if self.async_save and not self.save:
            raise ArgumentError("--async-save needs --save DIR")
        if self.keep_last_n < 0:
            raise ArgumentError(f"--keep-last-n {self.keep_last_n}: must be >= 1 (or 0 to keep every checkpoint)")
        if self.keep_last_n and not self.save:
            raise ArgumentError("--keep-last-n needs --save DIR")
        if self.finetune and not self.load:
            raise ArgumentError("--finetune needs --load DIR (the checkpoint whose weights the run starts from)")
        if self.finetune and self.save and os.path.realpath(self.load) == os.path.realpath(self.save):
            raise ArgumentError(f"--finetune --load {self.load} --save {self.save}: the finetuned run would restart at "
                                f"iteration 0 over the checkpoints it loads from (and again at every requeue); "
                                f"give --save another directory")

    def resolved(self, rank: int = 0) -> "CheckpointConfig":
        """What the run loads, decided from the disk: a --save directory that already holds a complete
        checkpoint is loaded when --load is not given (auto-resume, so a requeued job restarts with the same
        command line); ``--save X --load X`` on an empty X starts afresh with a warning (as Megatron);
        any other --load without a checkpoint is an ArgumentError."""
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
