"""The run configuration: one typed record of everything a training run was asked to do, built once
from the command line.

``build_parser`` collects the flags each part declares (model, parallelism, training, optimizer, data,
checkpointing, fault tolerance, logging, Hugging Face exports, test hooks), the Megatron-LM compatibility
flags (megatron_flags.py) and ``--config FILE.yaml`` (config_file.py, expanded before parsing); its errors
are one ArgumentError line, not argparse's usage text. ``load_run_config`` turns
a command line into a ``RunConfig`` in three separate steps: resolve the defaults (the preset, the
tokenizer's vocabulary, the sequence length, the decay length, the data-parallel size), validate
(pure checks, each raising ``ArgumentError`` with one line naming the flag and the fix), then look at
the disk (what ``--load`` resolves to, the data files). Nothing is built or written before it returns.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Tuple

from tri_megatron import test_hooks
from tri_megatron.config.arch import ModelArch
from tri_megatron.config import config_file, megatron_flags
from tri_megatron.config.checkpoint import CheckpointConfig
from tri_megatron.config.errors import ArgumentError
from tri_megatron.config.fault import FaultConfig
from tri_megatron.config.logs import LoggingConfig
from tri_megatron.config import model as model_flags
from tri_megatron.config.optim import OptimConfig
from tri_megatron.config.parallel import ParallelConfig
from tri_megatron.config.training import TrainingConfig
from tri_megatron.launcher import launch_env
from tri_megatron.config.export import ExportConfig
from tri_megatron.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    arch: ModelArch
    parallel: ParallelConfig
    training: TrainingConfig
    optim: OptimConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    fault: FaultConfig
    logging: LoggingConfig
    export: ExportConfig
    inject_nan_at_iter: Tuple[int, ...] = ()
    """Test hook (tri_megatron.test_hooks): make the loss NaN at these iterations."""
    megatron_flags: Tuple[str, ...] = ()
    """The Megatron-LM flags the command line gave (config/megatron_flags.py), as written."""

    def replace(self, **parts) -> "RunConfig":
        return dataclasses.replace(self, **parts)

    @property
    def num_microbatches(self) -> int:
        return self.training.num_microbatches(self.parallel)

    def data_args(self):
        """The flat view the data provider reads."""
        return self.data.with_training(seq_length=self.training.seq_length,
                                       micro_batch_size=self.training.micro_batch_size,
                                       seed=self.training.seed, vocab_size=self.arch.vocab_size)

    def to_dict(self) -> dict:
        """Every resolved setting, by part (printed at start, stored beside checkpoints)."""
        return {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                for f, v in ((f, getattr(self, f.name)) for f in dataclasses.fields(self))}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ArgumentError (printed as one line, on rank 0, by
    pretrain_tri.py) instead of the usage text on every rank."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            message += " (pretrain_tri.py --help lists the flags; README: Coming from Megatron-LM)"
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_tri.py",
        description="Pretrain a Tri model on megatron-core (any TP/PP/VPP/CP/DP layout).",
        allow_abbrev=False,
    )
    model_flags.add_flags(p)
    ParallelConfig.add_flags(p)
    TrainingConfig.add_flags(p)
    OptimConfig.add_flags(p)
    DataConfig.add_flags(p)
    CheckpointConfig.add_flags(p)
    LoggingConfig.add_flags(p)
    FaultConfig.add_flags(p)
    ExportConfig.add_flags(p)
    test_hooks.add_flags(p)
    megatron_flags.add_flags(p)
    p.add_argument(config_file.FLAG, metavar="RUN.yaml",
                   help="flags from a YAML file (keys: flag names without dashes); the command line overrides them")
    return p


def _one_line(fn, *a, **kw):
    """Run a check that raises ValueError with one line; re-raise it as ArgumentError."""
    try:
        return fn(*a, **kw)
    except ValueError as e:
        if isinstance(e, ArgumentError):
            raise
        raise ArgumentError(str(e)) from None


def config_from_namespace(ns: argparse.Namespace, world_size: int, rank: int = 0,
                          check_disk: bool = True) -> RunConfig:
    """Resolve, validate and (with ``check_disk``) check the files a parsed command line names."""
    megatron_flags.apply(ns)
    data = DataConfig.from_args(ns)
    tokenizer_vocab = None
    if ns.vocab_size is None and data.tokenizer:  # the model's vocabulary follows the tokenizer
        from tri_megatron.data.provider import data_vocab_size

        tokenizer_vocab = _one_line(data_vocab_size, data)
    arch = model_flags.resolve_arch(ns, tokenizer_vocab)
    parallel = ParallelConfig.from_args(ns, world_size)
    megatron_flags.check_arch(ns, arch, parallel.tp)
    training = TrainingConfig.from_args(ns, arch)
    cfg = RunConfig(
        arch=arch, parallel=parallel, training=training, optim=OptimConfig.from_args(ns, training.train_iters),
        data=data, checkpoint=CheckpointConfig.from_args(ns), fault=FaultConfig.from_args(ns),
        logging=LoggingConfig.from_args(ns), export=ExportConfig.from_args(ns),
        inject_nan_at_iter=tuple(getattr(ns, "inject_nan_at_iter", None) or ()),
        megatron_flags=megatron_flags.record(ns),
    )
    validate(cfg)
    if check_disk:
        megatron_flags.check_load(cfg.checkpoint.load)
        cfg = cfg.replace(checkpoint=cfg.checkpoint.resolved(rank))
        if not cfg.data.mock_data:
            from tri_megatron.data.provider import validate_data_args

            _one_line(validate_data_args, cfg.data_args())
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every check that needs no file; raises ArgumentError naming the flag and the fix."""
    cfg.parallel.validate(cfg.arch)
    model_flags.validate_arch(cfg.arch)
    cfg.training.validate(cfg.arch, cfg.parallel)
    cfg.optim.validate()
    if not cfg.data.mock_data and not cfg.data.data_path:
        raise ArgumentError("no training data: pass --data-path PREFIX... (see tools/preprocess_data.py) or --mock-data")
    if hasattr(cfg.data, "validate"):
        _one_line(cfg.data.validate, context_parallel_size=cfg.parallel.cp)
    cfg.checkpoint.validate()
    cfg.logging.validate()
    cfg.fault.validate(cfg.checkpoint.save)
    _one_line(cfg.export.validate, cfg.checkpoint.save, cfg.checkpoint.save_interval)


def load_run_config(argv: Optional[list] = None, world_size: Optional[int] = None, rank: Optional[int] = None,
                    check_disk: bool = True) -> RunConfig:
    """The RunConfig of a command line (default: sys.argv) for ``world_size`` processes (default: the
    launcher's); raises ArgumentError."""
    if world_size is None or rank is None:
        env = launch_env()
        world_size = env["world_size"] if world_size is None else world_size
        rank = env["rank"] if rank is None else rank
    import sys

    parser = build_parser()
    argv = config_file.expand(parser, sys.argv[1:] if argv is None else argv)
    return config_from_namespace(parser.parse_args(argv), world_size, rank, check_disk)
