#!/usr/bin/env python
"""Benchmark the Tri kernels against the unfused paths they replace.

1. Fused MTP loss (``tri_megatron.ops.fused_mtp_cross_entropy``, gradients computed in its forward:
   three GEMMs per token chunk) vs (a) megatron-core's unfused path, per head: output-layer GEMM
   (``torch.matmul``, what megatron's ``linear_with_grad_accumulation_and_async_allreduce`` runs at
   one rank without gradient-accumulation fusion) + ``megatron.core.tensor_parallel.
   vocab_parallel_cross_entropy``, and (b) plain ``F.linear`` + ``F.cross_entropy`` -- same inputs,
   same process, times interleaved. Default shapes: Tri-21B (hidden 5,120, vocab 124,416 split by TP
   1/2/4/8, one rank's shard in one process, 8,192 tokens per micro-batch, MTP depth 1 and 2: 1 + D
   heads sharing the output weight); ``--shape TOKENS,HIDDEN,VOCAB`` runs given shapes unscaled
   instead. Megatron's CE runs for real against a one-rank process group (its TP all-reduces are then
   no-ops on a [tokens] vector; the fused op's per-chunk ones too). Each row also gives the relative
   gradient error (norm) of the fused op against both unfused paths.
2. RoPE + query scale (``tri_megatron.ops.apply_rope_and_query_scale``) vs the unfused PyTorch ops:
   megatron's ``_apply_rotary_pos_emb_bshd`` on q and k, then the query factor multiply
   (``(q.float() * factor).to(dtype)``), for plain RoPE, RoPE+SSMax, RoPE+temperature and NoPE
   temperature-only, at Tri-21B attention shapes (32 q / 8 kv heads of dim 160 split by TP).

Every case is timed forward + backward (median of ``--iters`` after ``--warmup``; the loss paths
alternate within each repetition, as the machine may be shared) and its peak memory
measured above the live inputs (the loss rows also give the ratio without the weight / hidden gradient
outputs, which both paths produce alike and which dominate at high TP). Loss rows come in two
gradient modes (``--grad-mode``): ``bare`` (the weight gradient is a plain ``.grad``) and ``ddp``
(megatron DDP's fp32 ``main_grad``, the training configuration; see ``_bench_loss_case``).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the step (inputs).
* CPU: there are no allocator statistics, so the peak is the running sum of the allocator-level
  alloc / free events that ``torch.profiler`` (``profile_memory=True``) records during the step,
  less the buffers the CPU BLAS allocates and frees inside one GEMM (bf16 packing; cuBLAS keeps a
  persistent workspace instead). On CPU the sizes are divided by ``--scale`` (default 16 on CPU) in
  every dimension, and the fused op's tile budget by scale^2 (its GPU minimum chunk rows by scale), so
  the tiling (chunks per head) is that of the full-size run and the memory *ratio*
  carries over; CPU times are the PyTorch reference path, not the CUDA kernels.

Targets (issue 14): fused/unfused time <= 0.85 and peak memory <= 1/4 in ddp mode on CPU (fp32,
``--shape 4096,512,32768 --shape 2048,640,31104``), <= 0.9x the unfused time on an H100 at Tri-21B
shapes; RoPE+SSMax >= 2x faster than unfused. Usage: ``python tools/bench_kernels.py [--only loss|rope]
[--tp 1 2 4 8] [--mtp 1 2] [--grad-mode bare ddp] [--shape N,H,V ...] [--scale N] [--iters N]
[--dtype float32|bfloat16] [--json out.json]``; the loss rows end with a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tri_megatron.local_dist import free_port  # noqa: E402
from tri_megatron.mcore_internals import megatron_rope_bshd, vocab_parallel_cross_entropy_on  # noqa: E402
from tri_megatron.ops import ce_chunks  # noqa: E402
from tri_megatron.ops import fused_cross_entropy as fce  # noqa: E402
from tri_megatron.ops._kernels import kernels_available  # noqa: E402
from tri_megatron.ops.rope_ssmax import apply_rope_and_query_scale  # noqa: E402

TRI21B = dict(hidden=5120, vocab=124416, tokens=8192, heads=32, kv_heads=8, head_dim=160)


# ----------------------------------------------------------------------------------- measuring -----
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step, device, iters, warmup) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_interleaved(steps: dict, device, iters, warmup, per_rep: Optional[dict] = None) -> dict:
    """Median ms of each step, the steps alternating within every repetition (rotating their order),
    so slow phases of a shared machine hit all of them alike. ``per_rep``, if given, receives every
    step's list of times, one per repetition (for ratios paired within a repetition)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _sync(device)
    times = {name: [] for name in names}
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            times[name].append(time_ms(steps[name], device, 1, 0))
    if per_rep is not None:
        per_rep.update(times)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(step, device, reset) -> int:
    """Peak memory of one step above the live inputs (see the module docstring for the method);
    ``reset()`` first drops the previous step's gradients, so they are not in the baseline."""
    reset()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []  # (time, signed bytes) of the CPU allocator's allocs / frees during the step

    def allocations(ev):
        if ev.tag == _EventType.Allocation:
            yield ev
        for child in ev.children:
            yield from allocations(child)

    def walk(ev):
        if ev.tag == _EventType.Allocation:
            if ev.extra_fields.device.type == "cpu":
                events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
            return
        if ev.name in _GEMM_OPS:  # drop the CPU BLAS's packing buffers, allocated and freed inside one
            inner = list(allocations(ev))  # GEMM (cuBLAS uses a persistent workspace instead)
            freed = {a.extra_fields.ptr for a in inner if a.extra_fields.alloc_size < 0}
            for a in inner:
                f = a.extra_fields
                if f.device.type == "cpu" and f.ptr not in freed and f.alloc_size > 0:
                    events.append((a.start_time_ns, f.alloc_size))
                elif f.device.type == "cpu" and f.alloc_size < 0 and not any(
                        b.extra_fields.ptr == f.ptr and b.extra_fields.alloc_size > 0 for b in inner):
                    events.append((a.start_time_ns, f.alloc_size))  # a free of an outside tensor
            return
        for child in ev.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


# ----------------------------------------------------------------------------------- megatron CE ---
def _init_single_rank_group(device):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return dist.new_group([0])


def megatron_vocab_parallel_ce(device):
    """megatron's vocab_parallel_cross_entropy bound to a one-rank TP group (no parallel_state init)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vocab_parallel_cross_entropy_on(_init_single_rank_group(device))  # seam in mcore_internals


# ----------------------------------------------------------------------------------- loss bench ----
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _bench_loss_case(args, device, dtype, vce, tp, depth, grad_mode, h, n, v_local):
    """One (shape, MTP depth, gradient mode) row of the loss benchmark: three paths, same inputs.

    * ``megatron``: per head, the output-layer GEMM (``torch.matmul``) + megatron-core's
      ``vocab_parallel_cross_entropy`` (the unfused path of the model);
    * ``torch``: per head, ``F.linear`` + ``F.cross_entropy`` on fp32 logits;
    * ``fused``: ``fused_mtp_cross_entropy`` over all heads.
    The objective is the sum of all per-token losses (a unit upstream, which the fused op's default
    ``upstream_weights`` declare, so it rescales its stored gradients). grad_mode ``bare``: the weight
    gradient is a plain ``.grad``. ``ddp``: the weight carries megatron DDP's fp32 ``main_grad``
    (allocated before the step, like DDP's gradient buffer) and the step ends with DDP's backward hook
    (``main_grad += grad`` unless the op already accumulated into it); the fused op accumulates into
    ``main_grad`` as the model does under DDP. Times are interleaved (the paths alternate within each
    repetition) and the median is reported, with the span of fused / baseline within each repetition
    (``time_ratio*_range``: how far a shared machine moves the ratio); gradients of the paths are
    compared (relative norm).
    """
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(v_local, h, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    hiddens = [torch.randn(n, 1, h, device=device, generator=g).to(dtype).requires_grad_()
               for _ in range(1 + depth)]
    labels = [torch.randint(0, v_local, (1, n), device=device, generator=g) for _ in range(1 + depth)]
    ddp = grad_mode == "ddp"
    if ddp:
        weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        weight.grad_added_to_main_grad = False

    def clear():
        for t in (weight, *hiddens):
            t.grad = None

    def ddp_hook():
        if ddp:
            if weight.grad is not None and not weight.grad_added_to_main_grad:
                weight.main_grad.add_(weight.grad)
            weight.grad = None
            weight.grad_added_to_main_grad = False

    def megatron():
        clear()
        total = 0
        for x, lab in zip(hiddens, labels):  # output layer [s, b, V/tp] in the input dtype + megatron CE
            total = total + vce(torch.matmul(x, weight.t()), lab.t().contiguous()).sum()
        total.backward()
        ddp_hook()

    def plain_torch():
        clear()
        total = 0
        for x, lab in zip(hiddens, labels):
            logits = F.linear(x, weight)
            total = total + F.cross_entropy(logits.view(-1, v_local).float(), lab.t().reshape(-1),
                                            reduction="none").sum()
        total.backward()
        ddp_hook()

    def fused():
        clear()
        losses = fce.fused_mtp_cross_entropy(hiddens, weight, labels, accumulate_into_main_grad=ddp)
        sum(l.sum() for l in losses).backward()
        ddp_hook()

    paths = {"unfused": megatron, "torch": plain_torch, "fused": fused}
    row = dict(bench="mtp_loss", tp=tp, mtp_depth=depth, grad_mode=grad_mode, tokens=n, hidden=h,
               vocab_local=v_local, dtype=str(dtype).replace("torch.", ""),
               chunk_rows=fce.default_chunk_size(v_local, dtype, n, grads=True, device=device))
    # gradients of each path (one step from zero), then the fused op's backward path
    grads = {}
    for name, step in paths.items():
        if ddp:
            weight.main_grad.zero_()
        before = dict(fce.backward_path_counts)
        step()
        gw = (weight.main_grad if ddp else weight.grad).detach().clone()
        grads[name] = [gw] + [x.grad.detach().clone() for x in hiddens]
        if name == "fused":
            row["fused_backward"] = next(k for k in before if fce.backward_path_counts[k] > before[k])
        clear()
    for a, b in (("fused", "torch"), ("fused", "unfused"), ("unfused", "torch")):
        row[f"grad_rel_err_{a}_vs_{b}"] = max(_rel_err(x, y) for x, y in zip(grads[a], grads[b]))
    del grads
    # the floor: the three GEMMs per head alone (logits, hidden grad, weight grad), outputs preallocated
    flat = [(x.detach().reshape(n, h), torch.empty(n, v_local, dtype=dtype, device=device),
             torch.empty(n, h, dtype=dtype, device=device)) for x in hiddens]
    gw_out = torch.empty(v_local, h, dtype=dtype, device=device)
    w_det = weight.detach()

    def gemms():
        for xf, lg, gx in flat:
            torch.mm(xf, w_det.t(), out=lg)
            torch.mm(lg, w_det, out=gx)
            torch.mm(lg.t(), xf, out=gw_out)

    reps: dict = {}
    for name, ms in time_interleaved({**paths, "gemms": gemms}, device, args.iters, args.warmup, reps).items():
        row[f"{name}_ms"] = ms
    del flat, gw_out
    for name, step in paths.items():
        row[f"{name}_peak_mib"] = peak_bytes(step, device, clear) / 2**20
        clear()
    # the gradient outputs (a weight-sized .grad -- megatron's dummy under DDP -- and the hidden grads)
    # are the same in all paths; at high TP they are most of the fused peak, so report the peak
    # without them as well
    grads_mib = sum(t.numel() * t.element_size() for t in (weight, *hiddens)) / 2**20
    row["grads_mib"] = grads_mib
    for base in ("unfused", "torch"):
        sfx = "" if base == "unfused" else "_vs_torch"
        row[f"time_ratio{sfx}"] = row["fused_ms"] / row[f"{base}_ms"]
        # fused over this path within each repetition: the spread a shared machine puts on the ratio
        paired = [f / b for f, b in zip(reps["fused"], reps[base])]
        row[f"time_ratio{sfx}_range"] = [min(paired), max(paired)]
        row[f"mem_ratio{sfx}"] = row["fused_peak_mib"] / max(row[f"{base}_peak_mib"], 1e-9)
    # the three GEMMs alone over megatron's time: the lowest fused/megatron time ratio any exact method
    # (which must run those GEMMs) can reach on this machine
    row["floor_ratio"] = row["gemms_ms"] / row["unfused_ms"]
    row["mem_ratio_wo_grads"] = (max(row["fused_peak_mib"] - grads_mib, 0.0)
                                 / max(row["unfused_peak_mib"] - grads_mib, 1e-9))
    print(f"loss  n={n} h={h} v={v_local} D={depth} {grad_mode:4s} | GEMMs alone {row['gemms_ms']:9.1f} ms "
          f"| megatron {row['unfused_ms']:9.1f} ms "
          f"{row['unfused_peak_mib']:8.1f} MiB | torch {row['torch_ms']:9.1f} ms {row['torch_peak_mib']:8.1f} MiB"
          f" | fused {row['fused_ms']:9.1f} ms {row['fused_peak_mib']:8.1f} MiB [{row['fused_backward']}] | "
          f"time x{row['time_ratio']:.3f} [{_span(row['time_ratio_range'])}] (floor x{row['floor_ratio']:.3f}, "
          f"vs torch x{row['time_ratio_vs_torch']:.3f} [{_span(row['time_ratio_vs_torch_range'])}]) mem x{row['mem_ratio']:.3f} "
          f"(vs torch x{row['mem_ratio_vs_torch']:.3f}) | grad rel err vs torch "
          f"{row['grad_rel_err_fused_vs_torch']:.1e}, vs megatron {row['grad_rel_err_fused_vs_unfused']:.1e}",
          flush=True)
    return row


def bench_loss(args, device, dtype, scale):
    vce = megatron_vocab_parallel_ce(device)
    rows = []
    if args.shape:  # explicit (tokens, hidden, vocab) shapes at full size, the library's default tiling
        for n, h, v in args.shape:
            for depth in args.mtp:
                for grad_mode in args.grad_mode:
                    rows.append(_bench_loss_case(args, device, dtype, vce, 1, depth, grad_mode, h, n, v))
        return rows
    h, n = TRI21B["hidden"] // scale, TRI21B["tokens"] // scale
    saved = ce_chunks.TILE_BYTES, ce_chunks.MIN_GRAD_CHUNK_ROWS, ce_chunks.MIN_GRAD_CHUNK_ROWS_CPU
    ce_chunks.TILE_BYTES = max(1, saved[0] // (scale * scale))
    # the GPU's minimum chunk rows, scaled, on either device: the tiling of the full-size GPU run
    ce_chunks.MIN_GRAD_CHUNK_ROWS = ce_chunks.MIN_GRAD_CHUNK_ROWS_CPU = max(1, saved[1] // scale)
    try:
        for tp in args.tp:
            v_local = TRI21B["vocab"] // tp // scale
            for depth in args.mtp:
                for grad_mode in args.grad_mode:
                    rows.append(_bench_loss_case(args, device, dtype, vce, tp, depth, grad_mode, h, n, v_local))
    finally:
        ce_chunks.TILE_BYTES, ce_chunks.MIN_GRAD_CHUNK_ROWS, ce_chunks.MIN_GRAD_CHUNK_ROWS_CPU = saved
    return rows


def _span(lo_hi) -> str:
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"


def print_loss_table(rows):
    """Markdown table of the loss rows (what BENCHMARKS.md quotes)."""
    print("\n| tokens | hidden | vocab/tp | D | mode | 3 GEMMs alone ms | megatron ms | torch ms | fused ms "
          "| fused/megatron time | per repetition | GEMMs/megatron (floor) | fused/torch time | per repetition | megatron MiB | torch MiB | fused MiB | fused/megatron mem "
          "| fused/torch mem | grad rel err vs torch | vs megatron |")
    print("|" + "---|" * 21)
    for r in rows:
        print(f"| {r['tokens']} | {r['hidden']} | {r['vocab_local']} | {r['mtp_depth']} | {r['grad_mode']} "
              f"| {r['gemms_ms']:.0f} | {r['unfused_ms']:.0f} | {r['torch_ms']:.0f} | {r['fused_ms']:.0f} "
              f"| **{r['time_ratio']:.2f}** | {_span(r['time_ratio_range'])} | {r['floor_ratio']:.2f} "
              f"| {r['time_ratio_vs_torch']:.2f} | {_span(r['time_ratio_vs_torch_range'])} | {r['unfused_peak_mib']:.0f} | {r['torch_peak_mib']:.0f} "
              f"| {r['fused_peak_mib']:.0f} | **{r['mem_ratio']:.3f}** | {r['mem_ratio_vs_torch']:.3f} "
              f"| {r['grad_rel_err_fused_vs_torch']:.1e} | {r['grad_rel_err_fused_vs_unfused']:.1e} |", flush=True)


# ----------------------------------------------------------------------------------- CCE filter --
def bench_cce_filter(args, device, shape):
    """How exact is Cut Cross-Entropy's gradient filtering for us? (issue 14; not implemented here.)

    CCE skips, in its backward, every (token block x vocab block) tile of ``softmax - onehot`` whose
    entries are all below ``filter_eps`` (its default: ``finfo(dtype).eps / 32``, 2^-12 for bf16).
    For synthetic logit distributions -- flat (a freshly initialised output layer), a Zipf unigram bias
    ``-a log(rank)`` (vocab ids sorted by frequency, as CCE arranges) plus token-dependent logits, and
    peaked token-dependent logits with no vocab order; targets drawn from the softmax -- this
    reports the fraction of 128 x 256 tiles such a filter skips and the relative error (norm) it puts
    on the hidden and weight gradients, computed in fp32 against the unfiltered gradients.
    """
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, generator=g)
    w = torch.randn(v, h, device=device, generator=g) / h ** 0.5
    unigram = -torch.log(torch.arange(1, v + 1, device=device, dtype=torch.float32))
    rows = []
    for label, spread, bias in (("flat (init, W*0.02)", 0.02 * h ** 0.5, 0.0), ("zipf-1", 1.0, 1.0),
                                ("zipf-2 (long tail)", 1.0, 2.0), ("peaked, no vocab order", 4.0, 0.0)):
        logits = spread * (x @ w.t()) + bias * unigram
        p = torch.softmax(logits, dim=-1)
        target = torch.multinomial(p, 1, generator=g)[:, 0]
        grad = p.clone()
        grad[torch.arange(n), target] -= 1.0
        gx, gw = grad @ w, grad.t() @ x
        for name, eps in (("bf16 auto 2^-12", torch.finfo(torch.bfloat16).eps / 32),
                          ("fp32 auto 2^-28", torch.finfo(torch.float32).eps / 32)):
            tiles = grad.abs().unfold(0, 128, 128).unfold(1, 256, 256).amax(dim=(-1, -2))  # [n/128, v/256]
            keep = (tiles >= eps).repeat_interleave(128, 0).repeat_interleave(256, 1)
            kept = torch.zeros_like(grad)
            kept[: keep.shape[0], : keep.shape[1]] = grad[: keep.shape[0], : keep.shape[1]] * keep
            row = dict(bench="cce_filter", distribution=label, filter_eps=name, tokens=n, hidden=h, vocab=v,
                       mean_target_prob=float(p[torch.arange(n), target].mean()),
                       skipped_tiles=float((tiles < eps).float().mean()),
                       grad_x_rel_err=_rel_err(kept @ w, gx), grad_w_rel_err=_rel_err(kept.t() @ x, gw))
            rows.append(row)
            print(f"cce-filter {label:20s} eps {name:16s} mean p(target) {row['mean_target_prob']:.3f} | "
                  f"tiles skipped {row['skipped_tiles']:.3f} | grad rel err: hidden {row['grad_x_rel_err']:.1e} "
                  f"weight {row['grad_w_rel_err']:.1e}", flush=True)
    return rows


# ----------------------------------------------------------------------------------- rope bench ----
def _megatron_rope():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return megatron_rope_bshd()  # seam in mcore_internals


def bench_rope(args, device, dtype, scale):
    rope = _megatron_rope()
    s_len = TRI21B["tokens"] // scale
    d = TRI21B["head_dim"]
    rows = []
    for tp in args.tp:
        hq, hk = TRI21B["heads"] // tp, TRI21B["kv_heads"] // tp
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(s_len, 1, hq, d, device=device, generator=g).to(dtype).requires_grad_()
        k = torch.randn(s_len, 1, hk, d, device=device, generator=g).to(dtype).requires_grad_()
        s = (torch.rand(hq, device=device, generator=g) * 0.2 + 0.1).requires_grad_()
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(s_len, device=device, dtype=torch.float32), inv)
        freqs = torch.cat([ang, ang], dim=-1)[:, None, None, :]
        pos = torch.arange(s_len, device=device)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        floor_scale, attn_scale = 8192.0 / scale, 0.1

        def clear():
            for t in (q, k, s):
                t.grad = None

        def factor(mode):
            if mode == "ssmax":
                return torch.log1p(pos.float())[:, None] * s[None, :]
            return (torch.log(torch.floor((pos.float() + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0)[:, None]

        def step_of(forward, rotate):
            """One forward + backward of ``forward() -> (q_out, k_out)``; k's output only with RoPE."""
            def step():
                clear()
                qo, ko = forward()
                outs, grads = ([qo, ko], [gq, gk]) if rotate else ([qo], [gq])
                torch.autograd.backward(outs, grads)
            return step

        def unfused(mode, rotate):
            def forward():
                qo, ko = (rope(q, freqs), rope(k, freqs)) if rotate else (q, k)
                if mode != "none":
                    qo = (qo.float() * factor(mode)[:, None, :, None]).to(dtype)
                return qo, ko
            return step_of(forward, rotate)

        def fused(mode, rotate):
            return step_of(lambda: apply_rope_and_query_scale(
                q, k, freqs if rotate else None, apply_rope=rotate, mode=mode, ssmax_scale=s,
                floor_scale=floor_scale, attn_scale=attn_scale), rotate)

        for label, mode, rotate in (("rope", "none", True), ("rope+ssmax", "ssmax", True),
                                    ("rope+temperature", "temperature", True),
                                    ("nope+temperature", "temperature", False)):
            row = dict(bench="rope", case=label, tp=tp, tokens=s_len, q_heads=hq, kv_heads=hk, head_dim=d,
                       dtype=str(dtype).replace("torch.", ""))
            for name, step in (("unfused", unfused(mode, rotate)), ("fused", fused(mode, rotate))):
                row[f"{name}_ms"] = time_ms(step, device, args.iters, args.warmup)
                row[f"{name}_peak_mib"] = peak_bytes(step, device, clear) / 2**20
            row["speedup"] = row["unfused_ms"] / row["fused_ms"]
            row["mem_ratio"] = row["fused_peak_mib"] / max(row["unfused_peak_mib"], 1e-9)
            rows.append(row)
            print(f"rope  tp={tp} {label:17s} unfused {row['unfused_ms']:8.3f} ms "
                  f"{row['unfused_peak_mib']:8.1f} MiB | fused {row['fused_ms']:8.3f} ms "
                  f"{row['fused_peak_mib']:8.1f} MiB | speedup x{row['speedup']:.2f}", flush=True)
    return rows


# ----------------------------------------------------------------------------------- main ----------
def _shape(text: str) -> tuple:
    try:
        n, h, v = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants TOKENS,HIDDEN,VOCAB (three integers), got {text!r}")
    return n, h, v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["loss", "rope", "cce-filter"], default=None,
                   help="one part (cce-filter: Cut Cross-Entropy's gradient filter, not run by default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mtp", type=int, nargs="+", default=[1, 2], help="MTP depths D (1 + D heads)")
    p.add_argument("--grad-mode", nargs="+", default=["bare", "ddp"], choices=["bare", "ddp"],
                   help="weight gradient as a plain .grad, and/or into megatron DDP's fp32 main_grad")
    p.add_argument("--scale", type=int, default=None,
                   help="divide every size by this (default 1 on CUDA, 16 on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--shape", type=_shape, action="append", default=None, metavar="TOKENS,HIDDEN,VOCAB",
                   help="loss bench at this exact shape (one vocab shard, no scaling; repeatable) instead "
                        "of the scaled Tri-21B TP sweep")
    p.add_argument("--json", default=None, help="write all rows to this JSON file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda"
    scale = 1 if args.shape else (args.scale or (1 if on_gpu else 16))
    args.iters = args.iters or (10 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = dict(device=torch.cuda.get_device_name(device) if on_gpu else "cpu", torch=torch.__version__,
                kernels=kernels_available() if on_gpu else False, scale=scale,
                memory_method="cuda.max_memory_allocated" if on_gpu else "profiler allocation events")
    if not on_gpu:  # CPU ratios depend on the vector ISA (AVX2 / AVX-512) the GEMMs and softmax passes run on
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print("bench_kernels:", json.dumps(info), flush=True)
    if not on_gpu and not args.shape:
        print("CPU run: sizes / %d per dimension, reference (PyTorch) path; memory ratios carry over, "
              "times do not reflect the CUDA kernels." % scale, flush=True)
    rows = []
    if args.only in (None, "loss"):
        loss_rows = bench_loss(args, device, dtype, scale)
        print_loss_table(loss_rows)
        rows += loss_rows
    if args.only in (None, "rope"):
        rows += bench_rope(args, device, dtype, scale)
    if args.only == "cce-filter":
        for shape in args.shape or [(2048, 256, 32768)]:
            rows += bench_cce_filter(args, device, shape)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
