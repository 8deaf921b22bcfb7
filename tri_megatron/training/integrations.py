"""Optional integrations, imported only when a flag asks for them: Weights & Biases (``--wandb-project``)
and the torch profiler (``--profile``). Neither package is needed otherwise; a missing ``wandb`` is
refused at launch by LoggingConfig.validate (exit 2)."""

from __future__ import annotations

import json
import math
import os
from typing import Optional


def flat_scalars(record: dict, prefix: str = "") -> dict:
    """The finite numbers of a record, nested dicts flattened with '/': {"mixture": {"en": .4}} -> mixture/en."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[prefix + key] = float(value) if isinstance(value, bool) else value
    return out


class WandbWriter:
    """Weights & Biases on global rank 0. WANDB_MODE (e.g. offline: files only, `wandb sync` later) and
    the other WANDB_* variables are wandb's own; the run's resolved configuration goes to the run config."""

    def __init__(self, logging_cfg, run_cfg=None):
        import wandb  # an installed package is checked at launch (LoggingConfig.validate)

        self.wandb = wandb
        save = run_cfg.checkpoint.save if run_cfg is not None else None
        save_dir = logging_cfg.wandb_save_dir or (os.path.join(save, "wandb") if save else os.path.abspath("wandb"))
        os.makedirs(save_dir, exist_ok=True)
        name = logging_cfg.wandb_exp_name or (os.path.basename(os.path.normpath(save)) if save else None)
        config = json.loads(json.dumps(run_cfg.to_dict(), default=str)) if run_cfg is not None else None
        kwargs = dict(project=logging_cfg.wandb_project, name=name, dir=save_dir, config=config)
        if logging_cfg.wandb_entity:
            kwargs["entity"] = logging_cfg.wandb_entity
        if os.environ.get("WANDB_MODE"):
            kwargs["mode"] = os.environ["WANDB_MODE"]
        self.run = wandb.init(**kwargs)

    def log(self, scalars: dict, step: int) -> None:
        if scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.wandb.finish()


class Profiler:
    """The torch profiler on the ranks of ``--profile-ranks``, Megatron's meaning: it records from when
    ``--profile-step-start`` iterations are done to when ``--profile-step-end`` are (iterations start+1 ..
    end, 1-based), and writes one TensorBoard-viewable trace per rank (``rank<R>.<time>.pt.trace.json``,
    torch-tb-profiler's format) under --profile-dir (default --tensorboard-dir). CUDA activity is
    recorded where the run has real CUDA. The trace's steps count from the profiler's start
    (ProfilerStep#1 is iteration start+1; with start 0, ProfilerStep#0 is iteration 1)."""

    def __init__(self, logging_cfg, rank: int, cuda: bool):
        self.cfg = logging_cfg
        self.rank, self.cuda = rank, cuda
        self.active = bool(logging_cfg.profile) and rank in logging_cfg.profile_ranks
        self.prof = None
        self.done = 0  # iterations done at the last call of at()
        self.trace_dir = logging_cfg.profile_trace_dir

    def at(self, done: int) -> Optional[str]:
        """Call with the number of iterations done (before the first step, and after every step): starts,
        steps or stops the profiler. Returns a line to print when it stopped and wrote its trace."""
        self.done = done
        if not self.active:
            return None
        start, end = self.cfg.profile_step_start, self.cfg.profile_step_end
        warm = 1 if start > 0 else 0  # one warm-up step (traced, not recorded) where there is one, as Megatron
        if self.prof is None and done == start - warm:
            import torch.profiler as tp

            activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.cuda else [])
            os.makedirs(self.trace_dir, exist_ok=True)
            self.prof = tp.profile(
                activities=activities, record_shapes=True,
                schedule=tp.schedule(wait=0, warmup=warm, active=end - start, repeat=1),
                on_trace_ready=tp.tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}"))
            self.prof.start()
        elif self.prof is not None:
            self.prof.step()  # the trace is written once the last active step ends
            if done == end:
                return self.stop()
        return None

    def stop(self) -> Optional[str]:
        """Stop and write the trace (also when the run ends before --profile-step-end)."""
        if self.prof is None:
            return None
        self.prof.stop()
        self.prof = None
        self.active = False
        return (f"profiler: rank {self.rank} traced iterations {self.cfg.profile_step_start + 1}..{self.done} "
                f"into {self.trace_dir} (tensorboard --logdir {self.trace_dir})")
