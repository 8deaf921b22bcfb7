"""``pretrain_tri.py --dry-run --world-size N ...``: check a large launch on one CPU before ``sbatch``.

With the exact training flags and the job's GPU count, in one process and without a GPU:

1. validates everything ``pretrain_tri.py`` validates before it starts (flags and layout at world size
   N, data paths and the tokenizer's vocabulary, ``--load`` compatibility, the padded vocabulary),
   assuming the GPU nodes have Transformer Engine where the flags need it (``--fp8-format``);
2. for each distinct pipeline role (first stage, a middle stage, last stage) builds that rank's real
   megatron-core model chunks, DDP buffers and distributed optimizer at world size N on the meta
   device (``stage.measure_stage``: torch's fake process group, no memory, seconds), and runs one
   micro-batch forward and backward through them on meta tensors to measure stored activations;
3. reports per stage: parameters, weight / gradient-buffer / optimizer-state bytes, activations of one
   micro-batch and of the micro-batches 1F1B keeps in flight (megatron's warm-up count), and the
   total against the GPU (80 GB H100, 141 GB H200, or ``--gpu-memory``), with the same overhead and
   allocator margin as ``tools/plan_layout.py`` (``layout_model.Assumptions``).

Exit code 0: every stage fits; 1: a stage does not fit; 2: bad input (one line naming the flag).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import List, Optional

GIB = 2**30


@dataclasses.dataclass
class StageReport:
    pp_ranks: List[int]
    chunks: List[str]
    params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # one micro-batch
    head_bytes: int  # of which from the output layer on
    inflight: float  # micro-batches whose activations the busiest of pp_ranks holds (1F1B)
    total_bytes: float
    fits: bool


def dry_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: GPUs of the job (default: SLURM's / torchrun's variables)")
    p.add_argument("--gpu-type", choices=["h100", "h200", "b200"], default="h100", help="--dry-run: the GPU")
    p.add_argument("--gpu-memory", type=float, default=None, help="--dry-run: device memory in GiB (overrides --gpu-type)")
    p.add_argument("--dry-run-json", default=None, help="--dry-run: write the report to PATH")
    return p


@contextlib.contextmanager
def _transformer_engine_on_target():
    """Validation as on the GPU nodes, which have Transformer Engine (this host may not)."""
    from tri_megatron import runtime

    orig = runtime.transformer_engine_available
    runtime.transformer_engine_available = lambda: True
    try:
        yield
    finally:
        runtime.transformer_engine_available = orig


def validate(argv: list, world: int):
    """The RunConfig of argv at world size ``world``, checked as pretrain_tri.py checks it; ArgumentError
    on bad input. Its layers are the local ones: what this host builds (same parameters as the TE spec)."""
    from tri_megatron.config import load_run_config
    from tri_megatron.launch_checks import check_load_fits

    with _transformer_engine_on_target():
        cfg = load_run_config(argv, world_size=world, rank=0)
    check_load_fits(cfg)
    return cfg.replace(training=dataclasses.replace(cfg.training, transformer_impl="local"))


def roles(pp: int) -> List[List[int]]:
    """Pipeline ranks grouped by the structures they hold: first, the middle ones (identical), last."""
    if pp == 1:
        return [[0]]
    if pp == 2:
        return [[0], [1]]
    return [[0], list(range(1, pp - 1)), [pp - 1]]


def run(cfg, world: int, memory_gib: float) -> List[StageReport]:
    from tri_megatron.dryrun.stage import measure_stage
    from tri_megatron.config.arch import ModelArch
    from tri_megatron.perf import layout_model

    a = layout_model.Assumptions()
    pp, seq = cfg.parallel.pp, cfg.training.seq_length
    from tri_megatron.dryrun.compare import layout_of

    layout = layout_of(cfg)
    arch = cfg.arch
    m = cfg.num_microbatches
    fused_loss = cfg.training.fused_loss is not False  # on by default on GPUs with the Tri kernels built
    reports = []
    for ranks in roles(pp):
        st = measure_stage(cfg, world, ranks[0])
        inflight = max(layout_model.inflight_microbatches(layout, r, m) for r in ranks)
        layers = st.activation_bytes - st.head_bytes
        head = st.head_bytes
        if fused_loss and head:  # the fused loss cannot run on meta tensors: its workspace as plan_layout projects it
            head = layout_model.activation_bytes(arch, seq, layout, ranks[-1])["head"]
        # every micro-batch in flight holds its layers' activations; the head (output layer, loss) is live for
        # one micro-batch at a time, and so is the layer full recomputation rebuilds in backward (projected)
        transient = layout_model.activation_bytes(arch, seq, layout, ranks[0])["transient"]
        tensors = st.weight_bytes + st.grad_bytes + st.optimizer_bytes + inflight * layers + head + transient
        total = tensors * (1 + a.fragmentation) + a.memory_overhead_gib * GIB
        reports.append(StageReport(ranks, st.chunks, st.params, st.weight_bytes, st.grad_bytes, st.optimizer_bytes,
                                   st.activation_bytes, st.head_bytes, inflight, total,
                                   total <= memory_gib * GIB * a.usable_memory_fraction))
    return reports


def format_report(cfg, world: int, gpu: str, memory_gib: float, reports: List[StageReport]) -> str:
    from tri_megatron.perf import layout_model

    a = layout_model.Assumptions()
    par, tr = cfg.parallel, cfg.training
    lines = [f"dry run: {cfg.arch.name} on {world} x {gpu} ({memory_gib:.1f} GiB) | {par.describe()} "
             f"SP={par.sequence_parallel} | seq {tr.seq_length} x micro-batch {tr.micro_batch_size}, "
             f"{cfg.num_microbatches} micro-batches | recompute {tr.recompute_granularity or 'none'} | distributed "
             f"optimizer {'on' if par.distributed_optimizer else 'off'} | {'bf16' if tr.bf16 else 'fp32'}",
             "flags, layout, data and --load validated (Transformer Engine assumed on the GPU nodes)",
             "| PP ranks | chunks | params/GPU | weights | grad buffer | optimizer | activations/micro-batch | "
             "in flight | total | fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        ranks = f"{r.pp_ranks[0]}" if len(r.pp_ranks) == 1 else f"{r.pp_ranks[0]}-{r.pp_ranks[-1]}"
        lines.append(f"| {ranks} | {'; '.join(r.chunks)} | {r.params / 1e9:.3f}B | {r.weight_bytes / GIB:.2f} GiB | "
                     f"{r.grad_bytes / GIB:.2f} GiB | {r.optimizer_bytes / GIB:.2f} GiB | "
                     f"{r.activation_bytes / GIB:.2f} GiB | {r.inflight:g} | {r.total_bytes / GIB:.1f} GiB | "
                     f"{'yes' if r.fits else 'NO'} |")
    worst = max(reports, key=lambda r: r.total_bytes)
    lines.append(f"{'FITS' if all(r.fits for r in reports) else 'DOES NOT FIT'}: largest stage "
                 f"{worst.total_bytes / GIB:.1f} GiB of {memory_gib * a.usable_memory_fraction:.1f} GiB usable "
                 f"(total = (weights + grads + optimizer + in-flight activations) x {1 + a.fragmentation:g} + "
                 f"{a.memory_overhead_gib:g} GiB overhead); activations measured on meta tensors (flash-attention, "
                 f"fused-SwiGLU and TE-norm saves); the loss: " + ("the fused loss's workspace as plan_layout projects it "
                 f"(megatron's unfused loss, measured, in the table)" if tr.fused_loss is not False else
                 "megatron's unfused cross entropy, measured"))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    from tri_megatron.config.errors import ArgumentError
    from tri_megatron.launcher import launch_env
    from tri_megatron.perf.devices import GPU_SPECS

    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = dry_run_parser().parse_known_args(argv)
    try:
        world = own.world_size or launch_env()["world_size"]
        if world is None or world < 1 or (own.world_size is None and world == 1):
            raise ArgumentError("--dry-run needs the job's GPU count: pass --world-size N (e.g. 512)")
        if own.gpu_memory is not None and own.gpu_memory <= 0:
            raise ArgumentError(f"--gpu-memory {own.gpu_memory}: must be a positive number of GiB")
        cfg = validate(rest, world)
    except ArgumentError as e:
        print(f"pretrain_tri.py: error: {e}", file=sys.stderr)
        return 2
    spec = GPU_SPECS[own.gpu_type]
    memory = own.gpu_memory or spec.memory_gib
    reports = run(cfg, world, memory)
    print(format_report(cfg, world, spec.name if own.gpu_memory is None else "GPU", memory, reports), flush=True)
    from tri_megatron.dryrun.compare import compare, format_comparison

    rows = compare(cfg, reports)
    print("against plan_layout's projection (perf/layout_model.py) for this layout:\n" + format_comparison(rows))
    if own.dry_run_json:
        with open(own.dry_run_json, "w") as f:
            json.dump({"world_size": world, "memory_gib": memory, "stages": [dataclasses.asdict(r) for r in reports],
                       "projection": rows}, f, indent=1)
    return 0 if all(r.fits for r in reports) else 1
