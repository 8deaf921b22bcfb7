"""Training metrics: the console line, TensorBoard scalars and one JSON object per iteration."""

from __future__ import annotations

import json
import math
import os
import time


class MetricsLogger:
    """Writes on global rank 0 only; other ranks hold a silent instance."""

    def __init__(self, cfg, train_iters: int, rank: int):
        """``cfg``: the LoggingConfig; ``train_iters``: the run's length (for the ETA)."""
        self.enabled = rank == 0
        self.train_iters = train_iters
        self.tb = None
        self.json = None
        if not self.enabled:
            return
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.log_json)), exist_ok=True)
            self.json = open(cfg.log_json, "a", buffering=1)
        self.start = time.time()

    def iteration(self, record: dict, console: bool) -> None:
        if not self.enabled:
            return
        if self.json:
            self.json.write(json.dumps(record) + "\n")
        if self.tb:
            it = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, it)
        if console:
            left = self.train_iters - record["iteration"]
            eta = left * record["step_time_s"]
            parts = [
                f"iter {record['iteration']:6d}/{self.train_iters}",
                f"loss {record['lm_loss']:.4f}",
            ]
            if record.get("mtp_loss") is not None:
                parts.append(f"mtp {record['mtp_loss']:.4f}")
            parts += [
                f"lr {record['lr']:.3e}",
                f"grad-norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad-norm n/a",
                f"{record['tokens_per_sec']:.0f} tok/s",
                f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
                f"MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else "MFU n/a",
                f"ETA {_fmt(eta)}",
            ]
            print(" | ".join(parts), flush=True)

    def event(self, record: dict) -> None:
        """A non-iteration record in --log-json (e.g. {"event": "restart", ...}); rank 0 only."""
        if self.enabled and self.json:
            self.json.write(json.dumps(record) + "\n")

    def eval(self, iteration: int, losses: dict) -> None:
        if not self.enabled:
            return
        if self.json:
            self.json.write(json.dumps({"iteration": iteration, "eval": losses}) + "\n")
        if self.tb:
            for domain, value in losses.items():
                self.tb.add_scalar(f"valid/{domain}_loss", value, iteration)
        print(f"validation at iter {iteration}: " + ", ".join(f"{d} {v:.4f}" for d, v in losses.items()), flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.flush()
            self.tb.close()
        if self.json:
            self.json.close()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
