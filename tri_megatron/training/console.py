"""What the console says about a run around the per-iteration lines: the start banner (parameters counted
on the built model chunks of every rank, dtype, layout, global batch in tokens, what ``--load`` restored),
an ETA smoothed over the run, memory statistics per log interval, the end-of-run summary and the message
for a rerun of a run that is already complete. Formatting helpers are shared with ``metrics.py``."""

from __future__ import annotations

import os
import resource
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

GIB = 2**30


# ---------------------------------------------------------------------------------- formatting
def fmt_count(n: float) -> str:
    """12_345_678 -> '12.35M' (K, M, B, T)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fmt_mixture(weights: dict) -> str:
    return " ".join(f"{d} {w:.3f}" for d, w in weights.items())


# ---------------------------------------------------------------------------------- parameters
def _distinct_numel(p: torch.nn.Parameter, tp_rank: int) -> int:
    """This rank's share of the model's distinct parameters: a tensor-parallel shard counts on every TP
    rank, a replicated tensor on TP rank 0 only; the embedding copy megatron-core keeps on the last
    pipeline stage for tied/MTP embeddings (``shared``) not at all."""
    if getattr(p, "shared", False):
        return 0
    if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
        return p.numel()
    return 0


def count_parameters(model: Sequence[torch.nn.Module], device) -> Tuple[int, List[int]]:
    """(distinct parameters of the whole model, parameters each global rank holds), measured on the built
    (DDP-wrapped) chunks of every rank. Collective: every rank calls it."""
    from megatron.core import parallel_state

    params = [p for m in model for p in m.parameters()]
    held = sum(p.numel() for p in params)
    replica = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    distinct = sum(_distinct_numel(p, tp_rank) for p in params) if replica else 0
    world, rank = dist.get_world_size(), dist.get_rank()
    vec = torch.zeros(world + 1, dtype=torch.int64, device=device)
    vec[0], vec[1 + rank] = distinct, held
    dist.all_reduce(vec)
    vec = vec.cpu().tolist()
    return int(vec[0]), [int(v) for v in vec[1:]]


def dtype_text(config) -> str:
    """The precision of a megatron-core TransformerConfig, in words."""
    if getattr(config, "bf16", False):
        return "bf16 (fp32 gradient reduction and main weights)"
    if getattr(config, "fp16", False):
        return "fp16 (fp32 main weights)"
    return str(config.params_dtype).replace("torch.", "")


def banner_lines(cfg, rt, config, use_te: bool, total: int, per_rank: List[int], iteration: int,
                 consumed_samples: int) -> List[str]:
    """The start-up banner (rank 0 prints it). ``cfg``: the RunConfig; ``config``: the TransformerConfig."""
    tr, ckpt, arch = cfg.training, cfg.checkpoint, cfg.arch
    lo, hi = min(per_rank), max(per_rank)
    per = fmt_count(lo) if lo == hi else f"{fmt_count(lo)}-{fmt_count(hi)}"
    padded = arch.padded_vocab_size(cfg.parallel.tp)
    tokens = tr.tokens_per_iteration
    lines = [
        f"model {arch.name}: {total:,} parameters ({fmt_count(total)}"
        + (f"; vocabulary {arch.vocab_size} padded to {padded}" if padded != arch.vocab_size else "")
        + f"), {per} per rank over {len(per_rank)} rank(s) | dtype {dtype_text(config)}",
        f"layout {cfg.parallel.describe()}{' SP' if cfg.parallel.sequence_parallel else ''}"
        f"{' distributed-optimizer' if cfg.parallel.distributed_optimizer else ''} | {rt.describe()} | "
        f"{'Transformer Engine' if use_te else 'local (torch SDPA)'} layers",
        f"global batch {tr.global_batch_size} x {tr.seq_length} = {tokens:,} tokens per iteration "
        f"({tr.micro_batch_size} per micro-batch, {cfg.num_microbatches} micro-batches); "
        f"{tr.train_iters} iterations = {fmt_count(tr.train_iters * tokens)} tokens",
    ]
    start = f"starting at iteration {iteration}"
    if ckpt.load:
        if getattr(ckpt, "finetune", False):
            start += f" (--finetune: weights from --load {ckpt.load})"
        else:
            start += (f" (auto-resumed from --save {ckpt.save})" if ckpt.auto_resume else f" (--load {ckpt.load})")
            start += (f": restored iteration {iteration}, {fmt_count(consumed_samples * tr.seq_length)} tokens "
                      f"consumed ({consumed_samples:,} samples)")
    return lines + [start]


# ---------------------------------------------------------------------------------- ETA
class Eta:
    """Time left: the remaining iterations times the mean step time over the iterations after the first
    ``warmup`` ones this process ran (they include start-up costs), or over all of them until there are
    such; so it does not jump with one slow or fast interval. Evaluation and checkpoint time are not in it."""

    def __init__(self, train_iters: int, warmup: int = 3):
        self.train_iters, self.warmup = train_iters, warmup
        self.seen = 0
        self.all_sum = self.steady_sum = 0.0
        self.iteration: Optional[int] = None

    def observe(self, iteration: int, step_time: float) -> None:
        self.seen += 1
        self.iteration = iteration
        self.all_sum += step_time
        if self.seen > self.warmup:
            self.steady_sum += step_time

    def seconds_per_iteration(self) -> Optional[float]:
        if not self.seen:
            return None
        steady = self.seen - self.warmup
        return self.steady_sum / steady if steady > 0 else self.all_sum / self.seen

    def seconds_left(self) -> Optional[float]:
        rate = self.seconds_per_iteration()
        return None if rate is None else max(self.train_iters - self.iteration, 0) * rate


# ---------------------------------------------------------------------------------- memory
def memory_stats(rt, log_memory: bool) -> dict:
    """Memory of this log interval, the maximum over ranks (collective: every rank calls it at the same
    iterations). On CUDA: the peak allocated since the last call (``peak_mem_gib``; the peak is reset) and,
    with --log-memory, allocated / reserved now; with --log-memory on any device, the host's peak resident
    set (``host_peak_rss_gib``). Empty where there is nothing to say (no CUDA and no --log-memory)."""
    names, values = [], []
    if rt.cuda_kernels:
        names.append("peak_mem_gib")
        values.append(torch.cuda.max_memory_allocated() / GIB)
        if log_memory:
            names += ["mem_allocated_gib", "mem_reserved_gib"]
            values += [torch.cuda.memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB]
        torch.cuda.reset_peak_memory_stats()
    if log_memory:
        names.append("host_peak_rss_gib")
        values.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)  # KiB on Linux
    if not names:
        return {}
    vec = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    return dict(zip(names, vec.cpu().tolist()))


# ---------------------------------------------------------------------------------- a finished run
def finished_run_message(cfg) -> Optional[str]:
    """The message for a run whose checkpoint already reached --train-iters and that has nothing else to
    write (no --save, or --save is where it loads from), or None. Read from the checkpoint's metadata
    before anything is built; every rank reads the same file."""
    ckpt = cfg.checkpoint
    if not ckpt.load or getattr(ckpt, "finetune", False):
        return None
    if ckpt.save and os.path.realpath(ckpt.save) != os.path.realpath(ckpt.load):
        return None  # a copy of it is still to be written to --save
    from tri_megatron.training.checkpointing import find_latest_checkpoint, read_meta

    path = find_latest_checkpoint(ckpt.load)
    if path is None:
        return None
    meta = read_meta(path)
    iteration, train_iters = int(meta["iteration"]), cfg.training.train_iters
    if iteration < train_iters:
        return None
    tokens = int(meta.get("consumed_samples", 0)) * cfg.training.seq_length
    where = f"--save {ckpt.save}" if ckpt.auto_resume else f"--load {ckpt.load}"
    return (f"nothing to train: the checkpoint in {where} is at iteration {iteration} "
            f"({fmt_count(tokens)} tokens consumed) and --train-iters is {train_iters}; the run is complete. "
            f"Raise --train-iters to continue it, or give a new --save directory to start afresh")


def startup_banner(cfg, rt, trainer) -> List[str]:
    """The banner of the run ``trainer`` (a built, loaded tri_megatron.training.loop.Trainer). Collective:
    every rank calls it (the parameters are counted on every rank's chunks)."""
    total, per_rank = count_parameters(trainer.model, rt.device)
    return banner_lines(cfg, rt, trainer.config, trainer.use_te, total, per_rank, trainer.iteration,
                        trainer.consumed_samples)
