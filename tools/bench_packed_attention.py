"""Local (torch) attention of packed / sliding-window sequences: dense-mask SDPA vs the blocked varlen path.

    python tools/bench_packed_attention.py [--seq 8192] [--heads 4] [--groups 2] [--head-dim 64]
                                           [--window 4096] [--docs 4] [--block 512] [--reps 3]
                                           [--json out.json]

Cases (one sequence of ``--seq`` tokens, GQA ``--heads``/``--groups``, ``--dtype`` (fp32) on ``--device``
(cpu; ``cuda`` for a GPU, e.g. Tri-70B's ``--heads 64 --groups 8 --head-dim 128 --seq 32768``), forward +
backward):

* ``window``: one document, sliding window of ``--window`` keys (Tri-70B's RoPE layers);
* ``packed``: ``--docs`` equal documents, causal inside each (``--reset-attention-mask``);
* ``packed+window``: both.

Per case two ways: ``dense`` = ``F.scaled_dot_product_attention`` with the [s, s] boolean mask (what
megatron-core's dense attention_mask would feed it); ``blocked`` = ``tri_megatron.model.attention.
blocked_varlen_attention``, the path SDPACoreAttention takes (no [s, s] tensor). Peak memory: each way in
its own fresh process, one forward+backward after a warm-up, the process's peak resident memory above
what it held before (Linux VmHWM, reset through /proc/self/clear_refs; the inputs, their gradients and
the output are included for both). Time: both ways in one process, timed alternately (so the drifting
load of a shared machine hits both alike), median of ``--reps`` forward+backward passes after a warm-up
of each. The two outputs and input gradients are compared (max abs difference). Prints a table and the
ratios; ``--json`` writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _case_inputs(case: str, a):
    import torch

    s = a.seq
    docs = a.docs if case.startswith("packed") else 1
    window = (a.window - 1, 0) if case.endswith("window") else None
    lengths = [s // docs] * docs
    lengths[-1] += s - sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    q, k, v, w = (torch.randn(s, n, a.head_dim, generator=g).to(device=a.device, dtype=dtype)
                  for n in (a.heads, a.groups, a.groups, a.heads))
    return q, k, v, w, cu.to(a.device), max(lengths), window


def _attend_fn(case: str, way: str, a):
    import torch
    import torch.nn.functional as F

    q0, k0, v0, w, cu, max_seqlen, window = _case_inputs(case, a)
    scale = a.head_dim ** -0.5
    if way == "blocked":
        sys.path.insert(0, ROOT)
        from tri_megatron.model.attention import blocked_varlen_attention

        def attend(q, k, v):
            return blocked_varlen_attention(q, k, v, cu, max_seqlen, window=window, scale=scale, block=a.block)
    else:
        def attend(q, k, v):
            s = q.shape[0]
            tok = torch.arange(s, device=q.device)
            doc = torch.searchsorted(cu[1:].long(), tok, right=True)
            mask = (doc[:, None] == doc[None, :]) & (tok[None, :] <= tok[:, None])
            if window is not None:
                mask &= tok[None, :] >= tok[:, None] - window[0]
            out = F.scaled_dot_product_attention(q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None],
                                                 v.permute(1, 0, 2)[None], attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
            return out[0].permute(1, 0, 2)

    def step():
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out = attend(q, k, v)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        return out.detach(), grads

    return step


def _worker(case: str, way: str, a) -> dict:
    """way "dense" / "blocked": peak memory of one forward+backward (own process); way "time": both
    ways timed alternately in this process (slow drifts of a shared machine hit both alike)."""
    import torch

    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if way == "time":
        steps = {w: _attend_fn(case, w, a) for w in ("dense", "blocked")}
        times = {w: [] for w in steps}
        for w in steps:
            steps[w]()  # warm-up
        for _ in range(a.reps):
            for w, step in steps.items():
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times[w].append(time.perf_counter() - t0)
        return {"case": case, "times_s": times}
    step = _attend_fn(case, way, a)
    step()  # warm-up
    if cuda:  # device memory: peak allocated above what the inputs hold
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, grads = step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        out, grads = step()
        peak = _vm("VmHWM") - base
    path = os.path.join(a.scratch, f"{case}-{way}.pt")
    torch.save({"out": out.float().cpu(), "grads": [x.float().cpu() for x in grads]}, path)
    return {"case": case, "way": way, "peak_extra_bytes": peak, "result": path}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=4096, help="keys a query sees, itself included")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--block", type=int, default=512, help="queries per block of the blocked path")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peak = torch.cuda.max_memory_allocated)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cases", default="window,packed,packed+window")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=2, metavar=("CASE", "WAY"), help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.seq < 2 or a.heads % a.groups or a.docs < 1 or a.window < 1 or a.block < 1:
        print("bench_packed_attention.py: error: --seq >= 2, --heads divisible by --groups, --docs >= 1, "
              "--window >= 1, --block >= 1", file=sys.stderr)
        return 2
    if a.worker:
        print(json.dumps(_worker(a.worker[0], a.worker[1], a)))
        return 0

    import tempfile

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_packed_attention.py: error: --device {a.device}: no CUDA device here; use --device cpu",
              file=sys.stderr)
        return 2

    rows = []

    def worker(case, way, scratch):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, way, "--scratch", scratch,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                 if k not in ("worker", "scratch", "json", "cases")]]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as scratch:
        for case in a.cases.split(","):
            mem = {way: worker(case, way, scratch) for way in ("dense", "blocked")}
            times = worker(case, "time", scratch)["times_s"]
            dense, blocked = (torch.load(mem[w]["result"]) for w in ("dense", "blocked"))
            err = max([(dense["out"] - blocked["out"]).abs().max().item()]
                      + [(x - y).abs().max().item() for x, y in zip(dense["grads"], blocked["grads"])])
            for way in ("dense", "blocked"):
                rows.append({"case": case, "way": way, "time_s": statistics.median(times[way]),
                             "times_s": times[way], "peak_extra_bytes": mem[way]["peak_extra_bytes"],
                             "max_abs_diff_vs_dense": err})
    summary = []
    print(f"s={a.seq} heads={a.heads} groups={a.groups} head_dim={a.head_dim} window={a.window} docs={a.docs} "
          f"block={a.block} {a.dtype} {a.device} threads={a.threads}, forward+backward, median of {a.reps}")
    print("| case | way | time (s) | peak extra memory (MiB) | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['way']} | {r['time_s']:.3f} | {r['peak_extra_bytes'] / 2**20:.0f} | "
              f"{r['max_abs_diff_vs_dense']:.1e} |")
    for case in dict.fromkeys(r["case"] for r in rows):
        d, b = (next(r for r in rows if r["case"] == case and r["way"] == w) for w in ("dense", "blocked"))
        ratio = {"case": case, "memory_blocked_over_dense": b["peak_extra_bytes"] / max(d["peak_extra_bytes"], 1),
                 "time_blocked_over_dense": b["time_s"] / d["time_s"]}
        summary.append(ratio)
        print(f"{case}: blocked/dense memory {ratio['memory_blocked_over_dense']:.3f}, "
              f"time {ratio['time_blocked_over_dense']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(a).items() if k not in ("worker", "scratch", "json")},
                       "rows": rows, "ratios": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
