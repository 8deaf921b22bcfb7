"""Megatron-style command-line flags for pretrain_tri.py, preset resolution and validation.

``parse_args`` returns an ``argparse.Namespace`` whose architecture fields are filled from the
``--model`` preset unless overridden on the command line. ``validate_args`` checks everything that
can be checked before any process group or model exists and raises ``ArgumentError`` with one line
naming the flag and the fix; ``pretrain_tri.py`` turns it into exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tri_megatron.config.arch import ModelArch
from tri_megatron.presets import PRESETS, get_preset


class ArgumentError(ValueError):
    """A bad flag combination, reported as one line before anything is built or written."""


_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelArch) if f.name not in ("name", "context_length", "ssmax", "mtp_num_layers", "init_method_std")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_tri.py",
        description="Pretrain a Tri model on megatron-core (any TP/PP/VPP/CP/DP layout).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tri-tiny", choices=sorted(PRESETS), help="architecture preset")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--max-position-embeddings", type=int,
                   help="raise the preset's context length (needed for --seq-length above it)")
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--no-rope-freq", type=int, help="iRoPE: every k-th layer skips RoPE (0 = off)")
    g.add_argument("--window-size", type=int, help="sliding window in tokens on RoPE layers (0 = off)")
    g.add_argument("--window-attn-skip-freq", type=int, help="every k-th layer uses full attention")
    g.add_argument("--mtp-num-layers", type=int, default=0, help="multi-token prediction depth D")
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1)
    g.add_argument("--ssmax", action="store_true",
                   help="Scalable-Softmax: scale q by s_h*log(n), learnable s per layer and head")
    g.add_argument("--attn-temperature-tuning", action="store_true", default=None,
                   help="Llama-4/Tri-70B query temperature tuning on NoPE layers")
    g.add_argument("--no-attn-temperature-tuning", dest="attn_temperature_tuning", action="store_false")
    g.add_argument("--attn-floor-scale", type=float)
    g.add_argument("--attn-scale", type=float)
    g.add_argument("--fused-mtp-loss", action="store_true", default=None,
                   help="fused chunked softmax cross-entropy for main+MTP heads (default: on where the kernel is built)")
    g.add_argument("--no-fused-mtp-loss", dest="fused_mtp_loss", action="store_false")
    g.add_argument("--transformer-impl", choices=["auto", "transformer_engine", "local"], default="auto",
                   help="auto: Transformer Engine spec when TE imports, local (torch SDPA) otherwise")
    g.add_argument("--init-method-std", type=float, default=0.02)

    g = p.add_argument_group("parallelism")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when usable; CPU only where no GPU was expected (never under SLURM with "
                        "several tasks or GPUs, or a multi-GPU launch: there it is an error naming the cause)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "WSD", "constant"], default="cosine")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final decay phase (default 10%% of --lr-decay-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"], default="delayed")
    g.add_argument("--calculate-per-token-loss", action="store_true")

    g = p.add_argument_group("data")
    g.add_argument("--eval-interval", type=int, default=0, help="0 = no evaluation")
    g.add_argument("--eval-iters", type=int, default=2)

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="exit 2 when --load holds no checkpoint (default: --load X --save X on an empty X starts "
                        "from scratch with a warning, as Megatron)")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-json", default=None, help="write one JSON object per iteration to PATH")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of one device for MFU (default: detected; 989 for H100)")

    g = p.add_argument_group("fault tolerance (tri_megatron.training.fault)")
    g.add_argument("--exit-signals", default="SIGTERM,SIGINT,SIGUSR1", metavar="SIG[,SIG...]",
                   help="on any of these signals (on any rank) finish the current iteration, save and exit 0 "
                        "(SIGINT: Ctrl-C; a second one aborts without saving); "
                        "'none' to keep the default actions (default: %(default)s)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once this many minutes have passed since the process started")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 when the iteration is a multiple of N")
    g.add_argument("--slurm-requeue", action="store_true",
                   help="after saving on an exit signal or --exit-duration-in-mins, rank 0 runs "
                        "`scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from --save")
    g.add_argument("--on-nonfinite", choices=["skip", "stop"], default="skip",
                   help="a NaN/inf loss or gradient: skip the update (default) or stop the run (exit 3, no save)")
    g.add_argument("--max-nonfinite-skips", type=int, default=10,
                   help="stop (exit 3) after this many consecutive skipped non-finite steps; 0 = never")
    g.add_argument("--inject-nan-at-iter", type=int, nargs="+", default=[], metavar="ITER",
                   help="test hook: make the loss (and so every gradient) NaN at these iterations")

    _add_data_pipeline_args(p)
    from tri_megatron.convert.export_hook import add_export_args

    add_export_args(p)
    return p


def _add_data_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the file-based data pipeline (tri_megatron.data)."""
    from tri_megatron.data.provider import add_data_args

    add_data_args(parser)


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    preset = get_preset(args.model).arch
    if args.vocab_size is None and getattr(args, "tokenizer", None):
        from tri_megatron.data.provider import data_vocab_size

        try:
            args.vocab_size = data_vocab_size(args)  # the model's vocabulary follows the tokenizer
        except ValueError as e:  # missing path, empty directory, invalid tokenizer.json: one line, exit 2
            raise ArgumentError(str(e)) from None
    for field in _ARCH_FIELDS:
        if getattr(args, field, None) is None:
            setattr(args, field, getattr(preset, field))
    args.preset_seq_length = preset.context_length
    if args.max_position_embeddings is None:
        args.max_position_embeddings = preset.context_length
    if args.seq_length is None:
        args.seq_length = min(preset.context_length, args.max_position_embeddings)
    # 0 on the command line switches a preset feature off.
    for field in ("no_rope_freq", "window_size", "window_attn_skip_freq"):
        if getattr(args, field) == 0:
            setattr(args, field, None)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = max(args.train_iters, 1)
    return args


def world_size_from_env() -> int:
    """World size before torch.distributed exists: torchrun's or SLURM's variables, else 1."""
    from tri_megatron.training.distributed import launch_env

    return launch_env()["world_size"]


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ArgumentError (one line: the flag and the fix) for any inconsistent setting."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp), ("--micro-batch-size", args.micro_batch_size),
                    ("--global-batch-size", args.global_batch_size)):
        if v is None or v < 1:
            raise ArgumentError(f"{name}={v}: must be a positive integer")
    if world_size % (tp * pp * cp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple of {tp * pp * cp} processes"
        )
    if args.train_iters < 0:
        raise ArgumentError(f"--train-iters={args.train_iters}: must be >= 0 (0 saves the initial weights)")
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    if args.num_attention_heads % tp:
        raise ArgumentError(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}; "
            f"choose a TP size that divides it"
        )
    if args.num_query_groups % tp:
        raise ArgumentError(
            f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}; "
            f"use TP <= {args.num_query_groups} dividing it"
        )
    if args.num_attention_heads % args.num_query_groups:
        raise ArgumentError(
            f"--num-attention-heads {args.num_attention_heads} is not a multiple of --num-query-groups {args.num_query_groups}"
        )
    if vpp is not None:
        if vpp < 1:
            raise ArgumentError(f"--virtual-pipeline-model-parallel-size={vpp}: must be >= 1")
        if pp < 2 and vpp > 1:
            raise ArgumentError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
    if args.num_layers % (pp * (vpp or 1)):
        raise ArgumentError(
            f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"--virtual-pipeline-model-parallel-size {vpp or 1}; choose sizes whose product divides it"
        )
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}; use a multiple of {args.micro_batch_size * dp}"
        )
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    if vpp and vpp > 1 and num_micro % pp:
        raise ArgumentError(
            f"interleaved pipelining needs the number of micro-batches ({num_micro}) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}; raise --global-batch-size"
        )
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds the {args.model} context of {args.max_position_embeddings}; "
            f"pass --max-position-embeddings {args.seq_length} to extend it deliberately"
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron: meaningless without TP
    if args.sequence_parallel:
        from tri_megatron.model.specs import use_transformer_engine

        if not use_transformer_engine(args.transformer_impl):
            raise ArgumentError(
                "--sequence-parallel needs Transformer Engine's norms (megatron-core's torch norm refuses it); "
                "install transformer-engine[pytorch] or drop --sequence-parallel"
            )
    if args.seq_length % (tp if args.sequence_parallel else 1) or args.seq_length % (2 * cp if cp > 1 else 1):
        raise ArgumentError(
            f"--seq-length {args.seq_length} must be divisible by TP (with --sequence-parallel) and by 2 x CP; adjust it"
        )
    if cp > 1 and args.mtp_num_layers:
        raise ArgumentError("--mtp-num-layers does not support --context-parallel-size > 1 (megatron-core); use CP=1")
    if args.vocab_size < 2:
        raise ArgumentError(f"--vocab-size {args.vocab_size}: must be at least 2")
    if args.recompute_method and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method applies to --recompute-granularity full; add it or drop the method")
    if args.recompute_granularity == "full" and not args.recompute_method:
        args.recompute_method = "uniform"
    if args.recompute_granularity == "full" and args.recompute_num_layers is None:
        args.recompute_num_layers = 1
    if args.fp8_format:
        from tri_megatron.model.specs import transformer_engine_available

        if not transformer_engine_available():
            raise ArgumentError(
                f"--fp8-format {args.fp8_format} needs Transformer Engine, which is not importable here; "
                f"install transformer-engine[pytorch] or drop --fp8-format"
            )
        if args.transformer_impl == "local":
            raise ArgumentError("--fp8-format needs --transformer-impl transformer_engine (or auto)")
    if args.transformer_impl == "transformer_engine":
        from tri_megatron.model.specs import transformer_engine_available

        if not transformer_engine_available():
            raise ArgumentError("--transformer-impl transformer_engine: Transformer Engine is not importable; use auto or local")
    if args.ssmax and args.attn_temperature_tuning:
        raise ArgumentError("--ssmax and --attn-temperature-tuning are two forms of query scaling; pick one")
    if args.attn_temperature_tuning and not args.no_rope_freq:
        raise ArgumentError("--attn-temperature-tuning acts on NoPE layers only; set --no-rope-freq (e.g. 4)")
    if args.no_rope_freq and args.num_layers % args.no_rope_freq:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by --no-rope-freq {args.no_rope_freq}")
    if (args.ssmax or args.attn_temperature_tuning) and cp > 1:
        raise ArgumentError("query scaling (--ssmax / --attn-temperature-tuning) is not supported with --context-parallel-size > 1 yet")
    if not args.mock_data and not getattr(args, "data_path", None):
        raise ArgumentError("no training data: pass --data-path PREFIX... (see tools/preprocess_data.py) or --mock-data")
    from tri_megatron.training.checkpointing import find_latest_checkpoint

    # Auto-resume: a --save directory that holds a complete checkpoint is loaded when --load is not
    # given, so a preempted or requeued job restarts with the same command line.
    args.auto_resume = args.load is None and bool(args.save) and find_latest_checkpoint(args.save) is not None
    if args.auto_resume:
        args.load = args.save
    if args.load is not None and find_latest_checkpoint(args.load) is None:
        same = bool(args.save) and os.path.realpath(args.load) == os.path.realpath(args.save)
        if not same or args.exit_on_missing_checkpoint:
            raise ArgumentError(f"--load {args.load}: no complete checkpoint there; check the path or drop --load"
                                + (" (--exit-on-missing-checkpoint)" if same else ""))
        from tri_megatron.training.distributed import launch_env

        if launch_env()["rank"] == 0:  # the usual `--save X --load X`: the first run of a job starts afresh
            print(f"pretrain_tri.py: warning: --load {args.load}: no checkpoint yet; starting from scratch "
                  f"(--exit-on-missing-checkpoint to stop instead)", file=sys.stderr, flush=True)
        args.load = None
    if args.save_interval and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.log_interval < 1:
        raise ArgumentError("--log-interval must be >= 1")
    from tri_megatron.training.fault import parse_signals

    try:
        parse_signals(args.exit_signals)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ArgumentError(f"--exit-interval {args.exit_interval}: must be >= 1")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ArgumentError(f"--exit-duration-in-mins {args.exit_duration_in_mins}: must be > 0")
    if args.slurm_requeue and not args.save:
        raise ArgumentError("--slurm-requeue needs --save DIR: the requeued job resumes from it")
    if args.max_nonfinite_skips < 0:
        raise ArgumentError(f"--max-nonfinite-skips {args.max_nonfinite_skips}: must be >= 0 (0 = never stop)")
    if getattr(args, "data_path", None):
        from tri_megatron.data.provider import validate_data_args

        try:
            validate_data_args(args)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    from tri_megatron.convert.export_hook import validate_export_args

    try:
        validate_export_args(args)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return apply_preset(args)
