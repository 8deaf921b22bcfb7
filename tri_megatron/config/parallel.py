"""The parallel layout of a run: tensor, pipeline (and virtual), context and data parallel sizes,
sequence parallelism and the distributed optimizer; its flags and its checks against the architecture."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tri_megatron.config.arch import ModelArch
from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (None: no interleaving), as megatron-core takes it."""
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def model_chunks(self) -> int:
        """Model chunks each pipeline rank holds (VPP, or 1)."""
        return self.vpp or 1

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp} VPP={self.model_chunks} CP={self.cp} DP={self.dp}"

    def meta(self) -> dict:
        """The layout record of a checkpoint's tri_meta.json."""
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "dp": self.dp, "cp": self.cp}

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("parallelism")
        g.add_argument("--tensor-model-parallel-size", type=int, default=1)
        g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
        g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
        g.add_argument("--sequence-parallel", action="store_true")
        g.add_argument("--context-parallel-size", type=int, default=1)
        g.add_argument("--use-distributed-optimizer", action="store_true")
        g.add_argument("--overlap-grad-reduce", action="store_true")
        g.add_argument("--overlap-param-gather", action="store_true")

    @classmethod
    def from_args(cls, ns: argparse.Namespace, world_size: int) -> "ParallelConfig":
        """The layout for ``world_size`` processes; raises ArgumentError when the sizes do not fit it."""
        tp, pp, cp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size, ns.context_parallel_size
        for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp)):
            if v is None or v < 1:
                raise ArgumentError(f"{name}={v}: must be a positive integer")
        if world_size % (tp * pp * cp):
            raise ArgumentError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple of "
                f"{tp * pp * cp} processes")
        return cls(tp=tp, pp=pp, vpp=ns.virtual_pipeline_model_parallel_size, cp=cp, dp=world_size // (tp * pp * cp),
                   # as Megatron: sequence parallelism means nothing without TP
                   sequence_parallel=bool(ns.sequence_parallel) and tp > 1,
                   distributed_optimizer=bool(ns.use_distributed_optimizer),
                   overlap_grad_reduce=bool(ns.overlap_grad_reduce), overlap_param_gather=bool(ns.overlap_param_gather))

    def validate(self, arch: ModelArch) -> None:
        """Raise ArgumentError (one line: the flag and the fix) when the layout does not split the model."""
        tp, pp, vpp = self.tp, self.pp, self.vpp
        if arch.num_attention_heads % tp:
            raise ArgumentError(
                f"--num-attention-heads {arch.num_attention_heads} is not divisible by --tensor-model-parallel-size "
                f"{tp}; choose a TP size that divides it")
        if arch.num_query_groups % tp:
            raise ArgumentError(
                f"--num-query-groups {arch.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}; "
                f"use TP <= {arch.num_query_groups} dividing it")
        if vpp is not None:
            if vpp < 1:
                raise ArgumentError(f"--virtual-pipeline-model-parallel-size={vpp}: must be >= 1")
            if pp < 2 and vpp > 1:
                raise ArgumentError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if arch.num_layers % (pp * (vpp or 1)):
            raise ArgumentError(
                f"--num-layers {arch.num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
                f"--virtual-pipeline-model-parallel-size {vpp or 1}; choose sizes whose product divides it")
        if self.cp > 1 and arch.mtp_num_layers:
            raise ArgumentError("--mtp-num-layers does not support --context-parallel-size > 1 (megatron-core); use CP=1")
        if (arch.ssmax or arch.attn_temperature_tuning) and self.cp > 1:
            raise ArgumentError("query scaling (--ssmax / --attn-temperature-tuning) is not supported with "
                                "--context-parallel-size > 1 yet")
        try:
            arch.padded_vocab_size(tp)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
