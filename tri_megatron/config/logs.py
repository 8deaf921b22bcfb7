"""What a run reports: console interval, TensorBoard, the JSON-lines log, the peak throughput MFU is
measured against, memory statistics, and the optional integrations (Weights & Biases, the torch
profiler; tri_megatron.training.integrations); flags and checks."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from typing import Optional, Tuple

from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    log_json: Optional[str] = None
    peak_tflops: Optional[float] = None
    log_memory: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    wandb_entity: Optional[str] = None
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: Tuple[int, ...] = (0,)
    profile_dir: Optional[str] = None

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("logging")
        g.add_argument("--log-interval", type=int, default=1)
        g.add_argument("--tensorboard-dir", default=None)
        g.add_argument("--log-json", default=None, help="write one JSON object per iteration to PATH")
        g.add_argument("--peak-tflops", type=float, default=None,
                       help="dense bf16 peak of one device for MFU (default: detected; 989 for H100)")
        g.add_argument("--log-throughput", action="store_true",
                       help="accepted for Megatron-LM launch scripts: tokens/s, TFLOP/s and MFU are always logged")
        g.add_argument("--log-memory", "--log-memory-to-tensorboard", dest="log_memory", action="store_true",
                       help="memory statistics per log interval (GPU: allocated/reserved/peak; host: RSS) in the "
                            "console, --log-json and TensorBoard")
        g = parser.add_argument_group("optional integrations (packages not required unless asked for)")
        g.add_argument("--wandb-project", default=None,
                       help="log to Weights & Biases (needs the wandb package; WANDB_MODE=offline honoured)")
        g.add_argument("--wandb-exp-name", default=None, help="the W&B run name (default: the --save directory name)")
        g.add_argument("--wandb-save-dir", default=None, help="W&B local files (default: --save/wandb, else ./wandb)")
        g.add_argument("--wandb-entity", default=None, help="the W&B entity (team or user)")
        g.add_argument("--profile", action="store_true",
                       help="torch profiler over iterations --profile-step-start..--profile-step-end on "
                            "--profile-ranks; TensorBoard-viewable traces under --profile-dir or --tensorboard-dir")
        g.add_argument("--use-pytorch-profiler", action="store_true",
                       help="accepted for Megatron-LM launch scripts: --profile always uses the torch profiler")
        g.add_argument("--profile-step-start", type=int, default=10,
                       help="profiling starts when this many iterations are done (Megatron's meaning)")
        g.add_argument("--profile-step-end", type=int, default=12, help="profiling stops at this iteration count")
        g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that profile")
        g.add_argument("--profile-dir", default=None, help="trace directory (default: --tensorboard-dir)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "LoggingConfig":
        values = {f.name: getattr(ns, f.name, f.default) for f in dataclasses.fields(cls)}
        values["profile_ranks"] = tuple(values["profile_ranks"])
        return cls(**values)

    @property
    def profile_trace_dir(self) -> Optional[str]:
        return self.profile_dir or self.tensorboard_dir

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ArgumentError("--log-interval must be >= 1")
        if self.profile:
            if self.profile_step_start < 0 or self.profile_step_end <= self.profile_step_start:
                raise ArgumentError(f"--profile-step-start {self.profile_step_start} --profile-step-end "
                                    f"{self.profile_step_end}: need 0 <= start < end")
            if not self.profile_trace_dir:
                raise ArgumentError("--profile needs --profile-dir DIR or --tensorboard-dir DIR for its trace files")
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ArgumentError("--wandb-project needs the wandb package, which is not installed: "
                                "pip install wandb (or drop --wandb-project)")
