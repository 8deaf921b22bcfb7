"""Smoke test of tools/bench_kernels.py: it runs end to end on CPU at tiny sizes and reports every field.

Runs in a subprocess (the benchmark initialises a one-rank process group for megatron's CE).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--device", "cpu", "--scale", "64",
           "--tp", "8", "--mtp", "1", "--iters", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["info"]["memory_method"] == "profiler memory timeline"
    loss = [r for r in data["rows"] if r["bench"] == "mtp_loss"]
    rope = [r for r in data["rows"] if r["bench"] == "rope"]
    assert len(loss) == 1 and len(rope) == 4
    for r in loss:
        assert r["vocab_local"] == 124416 // 8 // 64 and r["mtp_depth"] == 1
        assert r["backward_plan"] in ("single", "acc", "sliced", "direct")
        for key in ("unfused_ms", "fused_ms", "unfused_peak_mib", "fused_peak_mib", "mem_ratio", "time_ratio"):
            assert r[key] > 0, key
    for r in rope:
        assert r["fused_ms"] > 0 and r["unfused_ms"] > 0 and r["speedup"] > 0
    assert "loss  tp=8 D=1" in res.stdout and "rope  tp=8" in res.stdout
