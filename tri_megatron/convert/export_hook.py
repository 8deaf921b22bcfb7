"""Intermediate Hugging Face exports during training (``--export-hf-interval N --export-hf-dir DIR``).

``tri_megatron.config.export.ExportConfig`` holds the flags; ``make_on_save(cfg, rank)`` returns the callable the
training loop calls after each checkpoint save, ``on_save(iteration, checkpoint_path)``. On rank 0,
every N iterations, it starts ``tools/convert_checkpoint.py --to-hf CHECKPOINT DIR/iter_NNNNNNN`` in
a background process (lower CPU priority, output in DIR/iter_NNNNNNN.log) and returns at once: training
never waits on a conversion. The conversion writes into a staging directory and renames it into
place when complete, so DIR only ever holds complete snapshots. ``exporter.wait()`` waits for the
ones still running (e.g. before the job exits); ``exporter.poll()`` reports finished ones.

Only saved iterations can be exported, so N should be a multiple of --save-interval
(``ExportConfig.validate`` says so). The checkpoint must stay on disk until its export finishes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import List, Optional

CONVERT_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "tools", "convert_checkpoint.py")


class HFExporter:
    """The on_save callable: launches background conversions, never waits for them."""

    def __init__(self, interval: int, out_dir: Optional[str], rank: int, save_dir: Optional[str] = None,
                 tokenizer: Optional[str] = None):
        self.interval, self.out_dir, self.rank = interval or 0, out_dir, rank
        self.save_dir, self.tokenizer = save_dir, tokenizer
        self.running: List[tuple] = []  # (iteration, Popen, log path)
        self.finished: List[tuple] = []  # (iteration, return code, log path)

    def command(self, iteration: int, checkpoint_path: str) -> list:
        from tri_megatron.training.checkpointing import iter_dir

        out = iter_dir(self.out_dir, iteration)
        cmd = [sys.executable, CONVERT_SCRIPT, "--to-hf", checkpoint_path, out, "--overwrite"]
        if shutil.which("nice"):  # below the training processes' priority
            cmd = ["nice", "-n", "10"] + cmd
        if self.tokenizer:
            cmd += ["--tokenizer", self.tokenizer]
        return cmd

    def __call__(self, iteration: int, checkpoint_path: Optional[str] = None):
        """Start the export of this save if it is due; returns the Popen or None. Never blocks."""
        self.poll()
        if self.rank != 0 or not self.interval or not self.out_dir or iteration % self.interval:
            return None
        from tri_megatron.training.checkpointing import iter_dir

        if checkpoint_path is None:
            checkpoint_path = iter_dir(self.save_dir, iteration)
        os.makedirs(self.out_dir, exist_ok=True)
        log_path = iter_dir(self.out_dir, iteration) + ".log"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        from tri_megatron.local_dist import LAUNCH_VARS

        for var in LAUNCH_VARS:
            env.pop(var, None)  # the converter is a single process of its own
        with open(log_path, "w") as log:
            proc = subprocess.Popen(self.command(iteration, checkpoint_path), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.running.append((iteration, proc, log_path))
        print(f"export-hf: converting iteration {iteration} in the background (pid {proc.pid}) -> "
              f"{iter_dir(self.out_dir, iteration)}", flush=True)
        return proc

    def poll(self) -> List[tuple]:
        """Collect finished exports; report failures. Returns the newly finished ones."""
        done = [(it, p, log) for it, p, log in self.running if p.poll() is not None]
        self.running = [r for r in self.running if r[1].poll() is None]
        new = [(it, p.returncode, log) for it, p, log in done]
        for it, rc, log in new:
            if rc != 0:
                print(f"export-hf: conversion of iteration {it} failed (exit {rc}); see {log}", flush=True)
        self.finished += new
        return new

    def wait(self, timeout: Optional[float] = None) -> List[int]:
        """Wait for running exports; returns the return codes of all exports so far, in launch order."""
        for _, proc, _ in self.running:
            proc.wait(timeout=timeout)
        self.poll()
        return [rc for _, rc, _ in sorted(self.finished)]


def make_on_save(cfg, rank: int) -> HFExporter:
    """The callable for Trainer.train(on_save=...) of a run configured by ``cfg`` (RunConfig):
    on_save(iteration, checkpoint_path=None)."""
    return HFExporter(cfg.export.export_hf_interval, cfg.export.export_hf_dir, rank,
                      save_dir=cfg.checkpoint.save, tokenizer=cfg.data.tokenizer)
