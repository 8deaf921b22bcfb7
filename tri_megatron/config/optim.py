"""The optimizer and its schedules: Adam, gradient clipping, learning-rate warm-up and decay (cosine,
linear, WSD, constant) counted in iterations; flags, defaults and checks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 1
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    """WSD's decay shape (megatron-core's scheduler: linear, cosine, exponential, minus_sqrt)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("optimizer")
        g.add_argument("--lr", type=float, default=3e-4)
        g.add_argument("--min-lr", type=float, default=0.0)
        g.add_argument("--lr-warmup-iters", type=int, default=0)
        g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
        g.add_argument("--lr-decay-style", choices=["cosine", "linear", "WSD", "constant", "inverse-square-root"],
                       default="cosine")
        g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                       help="WSD: length of the final decay phase (default 10%% of --lr-decay-iters)")
        g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"],
                       default="linear", help="WSD: shape of the final decay (Megatron's default is exponential)")
        g.add_argument("--weight-decay", type=float, default=0.1)
        g.add_argument("--adam-beta1", type=float, default=0.9)
        g.add_argument("--adam-beta2", type=float, default=0.95)
        g.add_argument("--adam-eps", type=float, default=1e-8)
        g.add_argument("--clip-grad", type=float, default=1.0)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, train_iters: int) -> "OptimConfig":
        """Flags with the decay length defaulting to the run's length."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        if values["lr_decay_iters"] is None:
            values["lr_decay_iters"] = max(train_iters, 1)
        return cls(**values)

    def wsd_decay_iters(self) -> Optional[int]:
        """WSD's final decay phase in iterations (None for the other styles)."""
        if self.lr_decay_style != "WSD":
            return None
        return self.lr_wsd_decay_iters or max(1, self.lr_decay_iters // 10)

    def validate(self) -> None:
        if self.lr_warmup_iters < 0 or self.lr_decay_iters < 1:
            raise ArgumentError(f"--lr-warmup-iters {self.lr_warmup_iters} / --lr-decay-iters {self.lr_decay_iters}: "
                                f"warm-up must be >= 0 and decay >= 1")
