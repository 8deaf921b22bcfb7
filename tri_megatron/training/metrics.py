"""Training metrics: the console lines (one per log interval, checkpoint saves, validation, the end-of-run
summary), TensorBoard scalars, one JSON object per iteration (``--log-json``) and, when asked, Weights &
Biases and the torch profiler (tri_megatron.training.integrations)."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from tri_megatron.training.console import Eta, fmt_count, fmt_duration, fmt_mixture
from tri_megatron.training.integrations import Profiler, flat_scalars


class MetricsLogger:
    """Console, TensorBoard, --log-json and W&B on global rank 0 only; the profiler on --profile-ranks.
    Every rank holds one and makes the same calls."""

    def __init__(self, cfg, train_iters: int, rank: int, run=None):
        """``cfg``: the LoggingConfig; ``train_iters``: the run's length (for the ETA); ``run``: the
        RunConfig (W&B's run config, the end-of-run summary's checkpoint directory)."""
        self.cfg, self.run = cfg, run
        self.enabled = rank == 0
        self.rank = rank
        self.train_iters = train_iters
        self.tb = self.json = self.wandb = None
        self.profiler = Profiler(cfg, rank, cuda=False)
        self.eta = Eta(train_iters)
        self.start = time.time()
        self.first_iteration: Optional[int] = None  # the iteration this process started from
        self.last: Optional[dict] = None  # the last iteration record
        self.step_time = self.tokens = self.mfu_time = 0.0  # sums over this process's iterations
        self.last_eval: Optional[tuple] = None  # (iteration, {domain: loss})
        self.last_save: Optional[tuple] = None  # (iteration, path)
        if not self.enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.log_json)), exist_ok=True)
            self.json = open(cfg.log_json, "a", buffering=1)
        if cfg.wandb_project:
            from tri_megatron.training.integrations import WandbWriter

            self.wandb = WandbWriter(cfg, run)

    # ------------------------------------------------------------------ plain lines
    def say(self, text: str) -> None:
        """One console line on rank 0, prefixed like every line of the trainer."""
        if self.enabled:
            print(f"tri_megatron: {text}", flush=True)

    def event(self, record: dict, text: Optional[str] = None) -> None:
        """A non-iteration record in --log-json (e.g. {"event": "restart", ...}) and, with ``text``, a
        console line; rank 0 only."""
        if not self.enabled:
            return
        if self.json:
            self.json.write(json.dumps(record) + "\n")
        if text:
            self.say(text)

    # ------------------------------------------------------------------ the run
    def begin(self, iteration: int, cuda: bool = False) -> None:
        """The loop starts at ``iteration`` (iterations done); ``cuda``: the run has real CUDA (the
        profiler records CUDA activity)."""
        self.first_iteration = iteration
        self.profiler.cuda = cuda
        self._profiler_at(iteration)

    def iteration(self, record: dict, console: bool) -> None:
        self._profiler_at(record["iteration"])
        if not self.enabled:
            return
        if self.first_iteration is None:
            self.first_iteration = record["iteration"] - 1
        dt = record["step_time_s"]
        self.eta.observe(record["iteration"], dt)
        self.last = record
        self.step_time += dt
        self.tokens += record["tokens_per_sec"] * dt
        if record.get("mfu") is not None:
            self.mfu_time += record["mfu"] * dt
        if self.json:
            self.json.write(json.dumps(record) + "\n")
        scalars = flat_scalars({k: v for k, v in record.items() if k != "iteration"})
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, record["iteration"])
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=record["iteration"])
        if console:
            print(" | ".join(self._line(record)), flush=True)

    def _line(self, record: dict) -> list:
        parts = [f"iter {record['iteration']:6d}/{self.train_iters}", f"loss {record['lm_loss']:.4f}"]
        if record.get("mtp_loss") is not None:
            parts.append(f"mtp {record['mtp_loss']:.4f}")
        parts += [
            f"lr {record['lr']:.3e}",
            f"grad-norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad-norm n/a",
        ]
        if record.get("consumed_tokens") is not None:
            parts.append(f"tokens {fmt_count(record['consumed_tokens'])}")
        parts += [
            f"{record['tokens_per_sec']:.0f} tok/s",
            f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
            f"MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else "MFU n/a",
        ]
        if record.get("mixture") and len(record["mixture"]) > 1:
            parts.append(f"mix {fmt_mixture(record['mixture'])}")
        if record.get("peak_mem_gib") is not None:
            parts.append(f"peak mem {record['peak_mem_gib']:.2f} GiB")
        if record.get("mem_allocated_gib") is not None:
            parts.append(f"mem {record['mem_allocated_gib']:.2f}/{record['mem_reserved_gib']:.2f} GiB alloc/resv")
        if record.get("host_peak_rss_gib") is not None:
            parts.append(f"host rss peak {record['host_peak_rss_gib']:.2f} GiB")
        left = self.eta.seconds_left()
        parts.append(f"ETA {fmt_duration(left)}" if left is not None else "ETA n/a")
        return parts

    def eval(self, iteration: int, losses: dict) -> None:
        if not self.enabled:
            return
        self.last_eval = (iteration, dict(losses))
        if self.json:
            self.json.write(json.dumps({"iteration": iteration, "eval": losses}) + "\n")
        if self.tb:
            for domain, value in losses.items():
                self.tb.add_scalar(f"valid/{domain}_loss", value, iteration)
        if self.wandb:
            self.wandb.log(flat_scalars({f"valid/{d}_loss": v for d, v in losses.items()}), step=iteration)
        print(f"validation at iter {iteration}: " + ", ".join(f"{d} {v:.4f}" for d, v in losses.items()), flush=True)

    def checkpoint_saved(self, iteration: int, path: str, seconds: float, background: bool = False) -> None:
        """A checkpoint was committed (every rank calls it; rank 0 says it)."""
        self.last_save = (iteration, path)
        self.event({"event": "save", "iteration": iteration, "path": path, "seconds": seconds, "time": time.time()},
                   f"saved checkpoint of iteration {iteration} to {path} in {seconds:.1f}s"
                   + (" (written in the background, --async-save)" if background else ""))

    def summary_lines(self) -> list:
        """The end-of-run summary (what this process trained), or [] when it trained nothing."""
        if self.last is None:
            return []
        last, first = self.last, self.first_iteration or 0
        done = last["iteration"] - first
        tok_s = self.tokens / self.step_time if self.step_time else 0.0
        mean_mfu = self.mfu_time / self.step_time if self.step_time and last.get("mfu") is not None else None
        seq = self.run.training.seq_length if self.run is not None else None
        total_tokens = last["consumed_samples"] * seq if seq else None
        status = ("complete" if last["iteration"] >= self.train_iters
                  else f"stopped at iteration {last['iteration']} of {self.train_iters}")
        lines = [
            f"run summary: {status}; iterations {first}->{last['iteration']} ({done} in this run), "
            f"{fmt_count(self.tokens)} tokens in this run"
            + (f", {fmt_count(total_tokens)} consumed in total" if total_tokens is not None else ""),
            f"  time {fmt_duration(time.time() - self.start)} (training steps {fmt_duration(self.step_time)}); "
            f"mean {tok_s:,.0f} tokens/s, MFU " + (f"{100 * mean_mfu:.1f}%" if mean_mfu is not None else "n/a"),
            f"  final loss {last['lm_loss']:.4f}" + (f", mtp {last['mtp_loss']:.4f}" if last.get("mtp_loss") is not None
                                                   else "")
            + (f"; validation at iter {self.last_eval[0]}: "
               + ", ".join(f"{d} {v:.4f}" for d, v in self.last_eval[1].items()) if self.last_eval else ""),
        ]
        if self.last_save is not None:
            lines.append(f"  checkpoint: {self.last_save[1]} (iteration {self.last_save[0]})")
        elif self.run is not None and self.run.checkpoint.save:
            lines.append(f"  checkpoint: none written in this run (--save {self.run.checkpoint.save})")
        else:
            lines.append("  checkpoint: none (no --save)")
        return lines

    def close(self) -> None:
        """End of the run: the profiler's trace if it is still recording, the summary, files closed."""
        line = self.profiler.stop()
        if line:
            print(f"tri_megatron: {line}", flush=True)
        if self.enabled:
            for text in self.summary_lines():
                self.say(text)
        if self.tb:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.json:
            self.json.close()
            self.json = None
        if self.wandb:
            self.wandb.close()
            self.wandb = None

    def _profiler_at(self, done: int) -> None:
        line = self.profiler.at(done)
        if line:
            print(f"tri_megatron: {line}", flush=True)
