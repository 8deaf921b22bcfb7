"""What a run reports: console interval, TensorBoard, the JSON-lines log and the peak throughput MFU is
measured against; flags and checks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    log_json: Optional[str] = None
    peak_tflops: Optional[float] = None

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("logging")
        g.add_argument("--log-interval", type=int, default=1)
        g.add_argument("--tensorboard-dir", default=None)
        g.add_argument("--log-json", default=None, help="write one JSON object per iteration to PATH")
        g.add_argument("--peak-tflops", type=float, default=None,
                       help="dense bf16 peak of one device for MFU (default: detected; 989 for H100)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "LoggingConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ArgumentError("--log-interval must be >= 1")
