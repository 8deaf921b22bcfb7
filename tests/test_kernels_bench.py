"""Smoke test of tools/bench_kernels.py: it runs end to end on CPU at tiny sizes and reports every field.

Runs in a subprocess (the benchmark initialises a one-rank process group for megatron's CE).
"""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--device", "cpu", "--scale", "64",
           "--tp", "8", "--mtp", "1", "--iters", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["info"]["memory_method"] == "profiler allocation events"
    assert data["info"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the ISA the ratios hold for
    loss = [r for r in data["rows"] if r["bench"] == "mtp_loss"]
    rope = [r for r in data["rows"] if r["bench"] == "rope"]
    assert len(loss) == 2 and len(rope) == 4
    assert sorted(r["grad_mode"] for r in loss) == ["bare", "ddp"]
    for r in loss:
        assert r["vocab_local"] == 124416 // 8 // 64 and r["mtp_depth"] == 1
        assert r["fused_backward"] == "stored"  # the sum objective is the upstream the op expects
        for key in ("gemms_ms", "unfused_ms", "torch_ms", "fused_ms", "unfused_peak_mib", "torch_peak_mib", "fused_peak_mib",
                    "mem_ratio", "time_ratio", "time_ratio_vs_torch", "mem_ratio_vs_torch", "floor_ratio"):
            assert r[key] > 0, key
        # three fp32-softmax computations of the same gradients (bf16 inputs): they agree to bf16
        for key in ("grad_rel_err_fused_vs_torch", "grad_rel_err_fused_vs_unfused", "grad_rel_err_unfused_vs_torch"):
            assert 0 <= r[key] < 2e-2, (key, r[key])
    for r in rope:
        assert r["fused_ms"] > 0 and r["unfused_ms"] > 0 and r["speedup"] > 0
    assert "loss  n=" in res.stdout and "rope  tp=8" in res.stdout and "| fused/megatron time" in res.stdout


def test_bench_kernels_explicit_shape_fp32_gradients_agree(tmp_path):
    """--shape runs the loss paths unscaled; in fp32 the fused gradients match both unfused paths."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--device", "cpu", "--only", "loss",
           "--shape", "96,16,700", "--mtp", "0", "2", "--grad-mode", "ddp", "--dtype", "float32", "--iters", "3",
           "--warmup", "0", "--threads", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["hidden"], r["vocab_local"], r["mtp_depth"]) for r in rows] == [
        (96, 16, 700, 0), (96, 16, 700, 2)]
    for r in rows:
        assert r["grad_rel_err_fused_vs_torch"] < 1e-5 and r["grad_rel_err_fused_vs_unfused"] < 1e-5
        # fused / baseline within each of the 3 repetitions: the ratio of the medians lies in that span
        for sfx in ("", "_vs_torch"):
            lo, hi = r[f"time_ratio{sfx}_range"]
            assert 0 < lo <= r[f"time_ratio{sfx}"] * (1 + 1e-12) and r[f"time_ratio{sfx}"] <= hi * (1 + 1e-12), (sfx, r)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--shape", "96,16"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--shape" in bad.stderr


def test_cpu_peak_counts_live_tensors_not_blas_workspace():
    """The CPU peak is the allocator's high-water mark above the start, without buffers a GEMM
    allocates and frees internally; a reset that frees old gradients does not lower the baseline."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_kernels

    held = {"old": torch.empty(4 << 20, dtype=torch.uint8)}  # freed by reset(), before the step

    def step():
        x = torch.ones(256, 256, dtype=torch.bfloat16)  # 128 KiB
        y = x @ x  # + 128 KiB output
        del x
        z = torch.empty(1 << 20, dtype=torch.uint8)  # + 1 MiB while y lives
        del y, z

    peak = bench_kernels.peak_bytes(step, torch.device("cpu"), reset=lambda: held.clear())
    assert peak == (1 << 20) + 256 * 256 * 2
