"""How the model is trained: batch and sequence sizes, iterations, precision, recomputation, FP8, the
layer implementation, the loss, evaluation and the device; flags, defaults and checks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tri_megatron.config.arch import ModelArch
from tri_megatron.config.errors import ArgumentError
from tri_megatron.config.parallel import ParallelConfig


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    seq_length: int
    """Tokens per training sample (at most the architecture's ``context_length``)."""
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 20
    """Default 20 (--train-iters, or --train-samples / --global-batch-size)."""
    seed: int = 1234
    device: str = "auto"
    bf16: bool = False
    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    """megatron-core's AttnBackend for Transformer Engine's attention (flash, fused or auto)."""
    fused_loss: Optional[bool] = None
    """Fused chunked softmax cross-entropy for the main and MTP heads (None: on where the CUDA kernel is built)."""
    mtp_loss_scaling_factor: float = 0.1
    calculate_per_token_loss: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    fp8_format: Optional[str] = None
    fp8_recipe: str = "delayed"
    eval_interval: int = 0
    eval_iters: int = 2

    def num_microbatches(self, parallel: ParallelConfig) -> int:
        return self.global_batch_size // (self.micro_batch_size * parallel.dp)

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    def recompute(self) -> dict:
        """Recomputation settings as megatron-core's TransformerConfig takes them."""
        full = self.recompute_granularity == "full"
        return dict(recompute_granularity=self.recompute_granularity,
                    recompute_method=self.recompute_method if full else None,
                    recompute_num_layers=self.recompute_num_layers if full else None)

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("training")
        g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto: CUDA when usable; CPU only where no GPU was expected (never under SLURM with "
                            "several tasks or GPUs, or a multi-GPU launch: there it is an error naming the cause)")
        g.add_argument("--micro-batch-size", type=int, default=2)
        g.add_argument("--global-batch-size", type=int, default=8)
        g.add_argument("--seq-length", type=int, help="default: the model's context length")
        g.add_argument("--train-iters", type=int, default=None, help="default 20 (or --train-samples)")
        g.add_argument("--seed", type=int, default=1234)
        g.add_argument("--bf16", action="store_true")
        g.add_argument("--transformer-impl", choices=["auto", "transformer_engine", "local"], default="auto",
                       help="auto: Transformer Engine spec when TE imports, local (torch SDPA) otherwise")
        g.add_argument("--attention-backend", choices=["auto", "flash", "fused", "unfused", "local"], default="auto",
                       help="Transformer Engine's attention backend (megatron-core's AttnBackend): auto, flash or "
                            "fused; unfused/local are refused (megatron's unfused attention is never used)")
        g.add_argument("--fused-loss", "--fused-mtp-loss", dest="fused_loss", action="store_true", default=None,
                       help="fused chunked softmax cross-entropy for the main head and the MTP heads (default: on "
                            "where the kernel is built); --fused-mtp-loss is the older name")
        g.add_argument("--no-fused-loss", "--no-fused-mtp-loss", dest="fused_loss", action="store_false")
        g.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1)
        g.add_argument("--calculate-per-token-loss", action="store_true")
        g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None)
        g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
        g.add_argument("--recompute-num-layers", type=int, default=None)
        g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
        g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"], default="delayed")
        g.add_argument("--eval-interval", type=int, default=0, help="0 = no evaluation")
        g.add_argument("--eval-iters", type=int, default=2)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, arch: ModelArch) -> "TrainingConfig":
        """Flags with their defaults resolved: the sequence length from the context length, full
        recomputation's method and layer count."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: getattr(ns, k) for k in names if hasattr(ns, k)}
        if values.get("train_iters") is None:
            values["train_iters"] = 20
        if values.get("seq_length") is None:
            values["seq_length"] = arch.context_length
        if ns.recompute_granularity == "full":
            values["recompute_method"] = ns.recompute_method or "uniform"
            if ns.recompute_num_layers is None:
                values["recompute_num_layers"] = 1
        return cls(**values)

    def validate(self, arch: ModelArch, parallel: ParallelConfig) -> None:
        """Raise ArgumentError (one line: the flag and the fix) for an inconsistent setting."""
        for name, v in (("--micro-batch-size", self.micro_batch_size), ("--global-batch-size", self.global_batch_size)):
            if v is None or v < 1:
                raise ArgumentError(f"{name}={v}: must be a positive integer")
        if self.train_iters < 0:
            raise ArgumentError(f"--train-iters={self.train_iters}: must be >= 0 (0 saves the initial weights)")
        dp, pp = parallel.dp, parallel.pp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ArgumentError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {dp}; use a multiple of {self.micro_batch_size * dp}")
        num_micro = self.num_microbatches(parallel)
        if parallel.vpp and parallel.vpp > 1 and num_micro % pp:
            raise ArgumentError(
                f"interleaved pipelining needs the number of micro-batches ({num_micro}) to be a multiple of "
                f"--pipeline-model-parallel-size {pp}; raise --global-batch-size")
        if self.seq_length > arch.context_length:
            raise ArgumentError(
                f"--seq-length {self.seq_length} exceeds the {arch.name} context of {arch.context_length}; "
                f"pass --max-position-embeddings {self.seq_length} to extend it deliberately")
        if self.seq_length % (parallel.tp if parallel.sequence_parallel else 1) or \
                self.seq_length % (2 * parallel.cp if parallel.cp > 1 else 1):
            raise ArgumentError(
                f"--seq-length {self.seq_length} must be divisible by TP (with --sequence-parallel) and by 2 x CP; "
                f"adjust it")
        if self.attention_backend in ("unfused", "local"):
            raise ArgumentError(f"--attention-backend {self.attention_backend}: megatron's unfused attention is never "
                                f"used here (core attention is Transformer Engine's or torch SDPA); use auto, flash "
                                f"or fused")
        if self.recompute_method and self.recompute_granularity != "full":
            raise ArgumentError("--recompute-method applies to --recompute-granularity full; add it or drop the method")
        from tri_megatron import runtime  # what this machine has (the dry run stands in for the GPU nodes)

        if self.fp8_format:
            if not runtime.transformer_engine_available():
                raise ArgumentError(
                    f"--fp8-format {self.fp8_format} needs Transformer Engine, which is not importable here; "
                    f"install transformer-engine[pytorch] or drop --fp8-format")
            if self.transformer_impl == "local":
                raise ArgumentError("--fp8-format needs --transformer-impl transformer_engine (or auto)")
        if self.transformer_impl == "transformer_engine" and not runtime.transformer_engine_available():
            raise ArgumentError("--transformer-impl transformer_engine: Transformer Engine is not importable; "
                                "use auto or local")
