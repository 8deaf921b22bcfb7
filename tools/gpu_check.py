#!/usr/bin/env python
"""One-command check of a new GPU node: kernels, kernel tests, short trainings, benchmarks, MFU.

Run it first on a new H100 / H200 node (its stages share an 8-minute budget, ``--budget``):

    python tools/gpu_check.py [--wheels wheels/] [--json runs/gpu_check/gpu_check.json]

Stages, each in its own subprocess with its own timeout; a failed or timed-out stage never stops
the ones after it:

  kernels  build or JIT-load the Tri CUDA kernels (tri_megatron.ops._kernels), or say why not
  tests    the kernel-vs-reference GPU tests: pytest tests/test_ops_*.py -k cuda
  train    tri-tiny for a few bf16 iterations (pretrain_tri.py, mock data) under each feature set:
           MTP + fused loss, SSMax, tri-70b style (iRoPE, sliding windows, temperature tuning),
           distributed optimizer, and the Transformer Engine spec when TE imports
  bench    fused loss vs megatron's unfused output layer + cross-entropy, and RoPE+SSMax vs
           unfused, time and memory at Tri-21B shapes (tools/bench_kernels.py)
  mfu      the tri-21b per-GPU proxy of a 512-GPU TP4 layout: MFU, step time, memory
           (tools/bench_mfu.py --proxy-gpus, as in BENCHMARKS.md)
  mtp      the same proxy with one MTP layer: the MTP share of the step, 1 - step(mfu) / step(MTP)

Writes one JSON (every stage: status ok / failed / timeout / skipped, seconds, reason, results,
the tail of its log; full logs beside it) and prints a short table. Exit code 0 when no stage
failed or timed out, 1 otherwise, 2 on bad arguments. On a machine without a CUDA device the GPU
stages are reported as skipped (with the reason) and ``train`` runs on the CPU.

Bringing megatron-core to a GPU machine that has torch but not megatron-core (and no internet):
on a machine with pip access, for the GPU machine's Python (3.12 here):

    pip download megatron-core==0.16.1 --python-version 3.12 --only-binary=:all: --no-deps -d wheels/
    pip download ninja --python-version 3.12 --only-binary=:all: --no-deps -d wheels/   # JIT kernel build

and, if that machine has no CUDA toolkit (no nvcc), NVIDIA's compiler wheels for its torch's CUDA
major version (13 here; ~100 MB; they complete the runtime headers a CUDA torch already installs):

    pip download "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
        "nvidia-nvvm==13.0.*" --only-binary=:all: --no-deps -d wheels/

carry wheels/ with the checkout, and on the GPU machine either ``pip install --no-deps wheels/*.whl``
or pass ``--wheels wheels/``: when megatron-core, ninja or nvcc is missing, this script runs
``pip install --no-deps --no-index`` on every wheel there before the stages.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import re
import signal
from shutil import which as shutil_which
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tri_megatron.local_dist import free_port  # noqa: E402 (standard library only, as this script needs)

STAGES = ("kernels", "tests", "train", "bench", "mfu", "mtp")
TIMEOUTS = {"kernels": 150, "tests": 90, "train": 120, "bench": 150, "mfu": 150, "mtp": 150}  # seconds, each a cap
FEATURES = {
    "mtp_fused": ["--mtp-num-layers", "1", "--fused-loss"],
    "ssmax": ["--ssmax"],
    "tri70b_style": ["--no-rope-freq", "4", "--window-size", "16", "--window-attn-skip-freq", "4",
                     "--attn-temperature-tuning"],
    "distopt": ["--use-distributed-optimizer"],
    "te": ["--transformer-impl", "transformer_engine", "--mtp-num-layers", "1"],
}
MFU_ARGS = ["--model", "tri-21b", "--bf16", "--proxy-gpus", "512", "--tensor-model-parallel-size", "4",
            "--sequence-parallel", "--use-distributed-optimizer", "--micro-batch-size", "1",
            "--global-batch-size", "512", "--warmup", "2", "--iters", "5", "--breakdown-iters", "2"]
# the fused-loss grid of issue 14 at Tri-21B shapes (TP 1/2/4/8 x MTP depth 0/1/2, DDP main_grad); each row
# is printed as it completes, so a timeout keeps the rows measured so far in the stage log
BENCH_ARGS = ["--tp", "1", "2", "4", "8", "--mtp", "0", "1", "2", "--grad-mode", "ddp", "--iters", "5"]


# ----------------------------------------------------------------------------------- plumbing ------
class Ctx:
    """What every stage sees: the parsed flags, the facts about this machine, its output dir, its deadline."""

    def __init__(self, args, facts: dict):
        self.args, self.facts = args, facts
        self.out = args.out
        self.deadline = 0.0  # set per stage
        self.mfu_step_s: Optional[float] = None  # the mfu stage's step time (the mtp stage's baseline)

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def gpu(self) -> bool:
        return bool(self.facts.get("cuda_device"))


class StageTimeout(Exception):
    pass


def child_env(**extra) -> dict:
    """The environment of a child run: no launcher variables (a single process, whatever the shell had)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                        "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run(ctx: Ctx, cmd: list, log_name: str, timeout: Optional[float] = None, env: Optional[dict] = None):
    """Run cmd (own process group) until it ends or the stage's time is up; (returncode, log text).
    Raises StageTimeout (after killing the whole group) when the time runs out."""
    limit = ctx.left() if timeout is None else min(timeout, ctx.left())
    if limit <= 0:
        raise StageTimeout(f"no time left for {log_name}")
    path = os.path.join(ctx.out, log_name + ".log")
    with open(path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env or child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise StageTimeout(f"{log_name}: still running after {limit:.0f} s (killed); log {path}")
    with open(path, errors="replace") as f:
        return rc, f.read()


def _kill(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, n: int = 1500) -> str:
    return text[-n:]


# ----------------------------------------------------------------------------------- facts ---------
def gather_facts(args) -> dict:
    """What this machine has: Python, torch, CUDA device, megatron-core, TE, apex, nvcc (installing
    megatron-core from --wheels first when it is missing)."""
    facts = {"python": platform.python_version(), "host": socket.gethostname()}
    from tri_megatron.ops._cuda_build import CudaHomeError, resolve_cuda_home

    missing = [dist for dist, mod in (("megatron-core", "megatron.core"), ("ninja", "ninja")) if not _importable(mod)]
    try:
        if resolve_cuda_home() is None:
            missing.append("nvcc")
    except CudaHomeError:
        pass  # reported below; a wrong CUDA_HOME is not fixed by wheels
    if args.wheels and missing:
        wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels],
                             capture_output=True, text=True, timeout=300)
        facts["wheels_installed"] = {"missing_before": missing, "wheels": [os.path.basename(w) for w in wheels],
                                     "returncode": res.returncode, "log": tail(res.stdout + res.stderr, 800)}
        importlib.invalidate_caches()
    import torch

    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    facts["cuda_device"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["cuda_device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                                "memory_gib": round(p.total_memory / 2**30, 1)}
    facts["megatron_core"] = _version("megatron-core") if _importable("megatron.core") else None
    facts["transformer_engine"] = _te_imports()
    facts["apex_wgrad_fusion"] = _importable("fused_weight_gradient_mlp_cuda")
    facts["ninja"] = _importable("ninja") or bool(shutil_which("ninja"))
    try:
        facts["cuda_home"] = resolve_cuda_home()
    except CudaHomeError as exc:  # a CUDA_HOME that is not a toolkit: say so, the kernels stage will too
        facts["cuda_home"] = f"error: {exc}"
    return facts


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _te_imports() -> bool:
    if not _importable("transformer_engine"):
        return False
    res = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True, timeout=120)
    return res.returncode == 0


# ----------------------------------------------------------------------------------- stages --------
_KERNEL_PROBE = """
import json, os, time
t0 = time.time()
from tri_megatron.ops import _kernels
m = _kernels.get_kernels()
err = _kernels._state.get("error")
print("GPU_CHECK_RESULT " + json.dumps({
    "loaded": m is not None, "module": getattr(m, "__name__", None), "file": getattr(m, "__file__", None),
    "prebuilt": getattr(m, "__name__", "") == "tri_megatron._cuda_kernels", "sources": _kernels.kernel_source_dir(),
    "error": None if m is not None or err is None else str(err)[-1500:], "seconds": round(time.time() - t0, 1)}))
"""


def _probe_result(text: str) -> Optional[dict]:
    for line in reversed(text.splitlines()):
        if line.startswith("GPU_CHECK_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    return None


def stage_kernels(ctx: Ctx) -> dict:
    if not ctx.gpu:
        return skipped(f"no CUDA device (torch {ctx.facts['torch']}, CUDA build: {ctx.facts['torch_cuda'] or 'no'}): "
                       "the kernels load only where they can run")
    rc, log = run(ctx, [sys.executable, "-c", _KERNEL_PROBE], "kernels", env=child_env(TRI_KERNELS_VERBOSE="1"))
    res = _probe_result(log)
    if rc != 0 or res is None:
        return failed(f"the probe exited {rc}", log=tail(log))
    if not res["loaded"]:
        why = res["error"] or "unknown"
        if not ctx.facts.get("ninja"):
            why += " (ninja is not installed: the JIT build needs it; bring its wheel, see --help)"
        if not ctx.facts.get("cuda_home") or str(ctx.facts["cuda_home"]).startswith("error"):
            why += f" (CUDA toolkit: {ctx.facts.get('cuda_home') or 'no nvcc found; bring the nvidia compiler wheels, see --help'})"
        return failed(f"kernels not loaded: {why}", results=res, log=tail(log))
    how = "prebuilt extension" if res["prebuilt"] else f"JIT-built from {res['sources']}"
    return ok(f"loaded ({how}, {res['seconds']} s)", results=res)


def stage_tests(ctx: Ctx) -> dict:
    if not ctx.gpu:
        return skipped("no CUDA device: the kernel-vs-reference tests' cuda cases need one "
                       "(CPU CI runs the same tests on the kernel emulator)")
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_ops_*.py")))
    rc, log = run(ctx, [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider",
                        "--disable-warnings", "-rfE"], "tests")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", log)}
    res = {"returncode": rc, **counts}
    if rc == 0 and counts.get("passed", 0) > 0:
        return ok(f"{counts['passed']} passed" + (f", {counts['skipped']} skipped" if counts.get("skipped") else ""),
                  results=res)
    return failed(f"pytest exited {rc}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), results=res, log=tail(log))


def stage_train(ctx: Ctx) -> dict:
    if not ctx.facts.get("megatron_core"):
        return failed("megatron-core does not import: bring its wheel (--wheels, see --help)")
    iters = ctx.args.iters or (5 if ctx.gpu else 2)
    shape = ["--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8"] if ctx.gpu else \
        ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2"]
    names = ctx.args.features or [f for f in FEATURES if f != "te" or ctx.facts.get("transformer_engine")]
    runs, problems = {}, []
    if "te" not in names and not ctx.args.features:
        runs["te"] = {"status": "skipped", "reason": "Transformer Engine does not import here"}
    for name in names:
        log_json = os.path.join(ctx.out, f"train_{name}.jsonl")
        if os.path.exists(log_json):
            os.remove(log_json)
        cmd = [sys.executable, os.path.join(ROOT, "pretrain_tri.py"), "--model", "tri-tiny", "--mock-data", "--bf16",
               "--device", "cuda" if ctx.gpu else "cpu", *shape, "--train-iters", str(iters), "--lr", "1e-3",
               "--lr-decay-style", "constant", "--log-interval", "1", "--log-json", log_json, *FEATURES[name]]
        t0 = time.time()
        try:
            rc, log = run(ctx, cmd, f"train_{name}", env=child_env(MASTER_ADDR="127.0.0.1",
                                                                    MASTER_PORT=str(free_port())))
        except StageTimeout as exc:
            runs[name] = {"status": "timeout", "reason": str(exc)}
            problems.append(f"{name}: timeout")
            continue
        recs = []
        if os.path.exists(log_json):
            with open(log_json) as f:
                recs = [r for r in map(json.loads, f) if "lm_loss" in r]
        losses = [r["lm_loss"] for r in recs]
        entry = {"seconds": round(time.time() - t0, 1), "iterations": len(recs), "returncode": rc,
                 "losses": losses, "tokens_per_s": recs[-1].get("tokens_per_sec") if recs else None,
                 "step_time_s": recs[-1].get("step_time_s") if recs else None}
        if rc != 0 or len(recs) != iters or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
            entry.update(status="failed", log=tail(log))
            problems.append(f"{name}: exit {rc}, {len(recs)}/{iters} iterations, losses {losses}")
        else:
            entry["status"] = "ok"
        runs[name] = entry
    done = [n for n, r in runs.items() if r["status"] == "ok"]
    summary = f"{len(done)}/{len(names)} feature sets ran {iters} bf16 iterations on {'GPU' if ctx.gpu else 'CPU'}"
    if problems:
        return failed(summary + "; " + "; ".join(problems), results=runs)
    return ok(summary, results=runs)


def stage_bench(ctx: Ctx) -> dict:
    if not ctx.gpu:
        return skipped("no CUDA device: on CPU both paths are PyTorch references, so their times say nothing "
                       "about the kernels (tools/bench_kernels.py runs on CPU for the memory ratios)")
    out = os.path.join(ctx.out, "bench_kernels.json")
    rc, log = run(ctx, [sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), *BENCH_ARGS, "--json", out],
                  "bench")
    if rc != 0 or not os.path.exists(out):
        return failed(f"bench_kernels.py exited {rc}", log=tail(log))
    with open(out) as f:
        data = json.load(f)
    loss = [{k: r.get(k) for k in ("tp", "mtp_depth", "grad_mode", "fused_ms", "unfused_ms", "time_ratio",
                                   "floor_ratio", "fused_peak_mib", "unfused_peak_mib", "mem_ratio",
                                   "fused_backward", "grad_rel_err_fused_vs_unfused")}
            for r in data["rows"] if r.get("bench") == "mtp_loss"]
    rope = [{k: r.get(k) for k in ("case", "tp", "fused_ms", "unfused_ms", "speedup", "mem_ratio")}
            for r in data["rows"] if r.get("bench") == "rope"]
    parts = [f"loss TP{r['tp']} D{r['mtp_depth']}: time x{r['time_ratio']:.2f} mem x{r['mem_ratio']:.2f}" for r in loss]
    parts += [f"{r['case']} TP{r['tp']}: x{r['speedup']:.2f} faster" for r in rope if r["case"] == "rope+ssmax"]
    return ok("; ".join(parts) + " (fused vs unfused)", results={"info": data.get("info"), "loss": loss, "rope": rope})


def stage_mfu(ctx: Ctx) -> dict:
    if not ctx.gpu:
        return skipped("no CUDA device: the per-GPU proxy measures a GPU (bench_mfu.py runs tri-tiny on CPU as a "
                       "smoke test only)")
    out = os.path.join(ctx.out, "bench_mfu_tri21b.json")
    rc, log = run(ctx, [sys.executable, os.path.join(ROOT, "tools", "bench_mfu.py"), *MFU_ARGS, "--json", out], "mfu")
    if rc != 0 or not os.path.exists(out):
        return failed(f"bench_mfu.py exited {rc}", log=tail(log))
    with open(out) as f:
        data = json.load(f)
    r = data.get("results", {})
    est = data.get("proxy", {}).get("pipeline_estimate", {})
    res = {k: r.get(k) for k in ("mfu", "hfu", "step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu",
                                 "peak_memory_gib")}
    res["layout_mfu_estimate"] = est.get("mfu")
    ctx.mfu_step_s = res["step_time_s"]
    res["peak_tflops"] = data.get("peak_tflops")
    mfu = f"{res['mfu']:.1%}" if isinstance(res["mfu"], float) else "n/a (unknown peak)"
    return ok(f"tri-21b TP4 proxy: MFU {mfu}, step {res['step_time_s']:.2f} s, "
              f"{res['tokens_per_s_per_gpu']:.0f} tok/s/GPU, peak {res['peak_memory_gib']:.1f} GiB", results=res)


def stage_mtp(ctx: Ctx) -> dict:
    if not ctx.gpu:
        return skipped("no CUDA device: the MTP share is a share of the per-GPU proxy's step on a GPU")
    out = os.path.join(ctx.out, "bench_mfu_tri21b_mtp1.json")
    rc, log = run(ctx, [sys.executable, os.path.join(ROOT, "tools", "bench_mfu.py"), *MFU_ARGS,
                        "--mtp-num-layers", "1", "--json", out], "mtp")
    if rc != 0 or not os.path.exists(out):
        return failed(f"bench_mfu.py --mtp-num-layers 1 exited {rc}", log=tail(log))
    with open(out) as f:
        r = json.load(f).get("results", {})
    res = {"step_time_s": r.get("step_time_s"), "step_time_s_no_mtp": ctx.mfu_step_s,
           "peak_memory_gib": r.get("peak_memory_gib"), "mtp_share": None}
    if not ctx.mfu_step_s:
        return failed(f"step {res['step_time_s']:.2f} s with one MTP layer, but no step without it: the share "
                      "needs the mfu stage (run --stages mfu,mtp)", results=res)
    res["mtp_share"] = 1.0 - ctx.mfu_step_s / res["step_time_s"]
    return ok(f"tri-21b TP4 proxy, one MTP layer: step {res['step_time_s']:.2f} s against {ctx.mfu_step_s:.2f} s, "
              f"MTP share {res['mtp_share']:.1%}", results=res)


STAGE_FUNCS: dict[str, Callable[[Ctx], dict]] = {
    "kernels": stage_kernels, "tests": stage_tests, "train": stage_train, "bench": stage_bench, "mfu": stage_mfu,
    "mtp": stage_mtp}
TITLES = {"kernels": "(a) build / JIT-load the kernels", "tests": "(b) kernel-vs-reference GPU tests",
          "train": "(c) tri-tiny bf16 per feature set", "bench": "(d) fused vs unfused at Tri-21B shapes",
          "mfu": "(e) tri-21b per-GPU proxy MFU", "mtp": "(f) MTP share of the tri-21b proxy step"}


def ok(summary, results=None, log=None):
    return {"status": "ok", "summary": summary, "results": results, "log": log}


def failed(summary, results=None, log=None):
    return {"status": "failed", "summary": summary, "results": results, "log": log}


def skipped(reason):
    return {"status": "skipped", "summary": reason, "results": None, "log": None}


# ----------------------------------------------------------------------------------- main ----------
def _fail(msg: str):
    print(f"gpu_check.py: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="directory for logs and JSON")
    p.add_argument("--json", default=None, help="the report (default OUT/gpu_check.json)")
    p.add_argument("--wheels", default=None,
                   help="directory of wheels to install when megatron-core, ninja or nvcc is missing")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--features", default=None, help=f"train stage: comma-separated subset of {','.join(FEATURES)}")
    p.add_argument("--iters", type=int, default=None, help="train stage iterations (default 5 on GPU, 2 on CPU)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages together (default 480)")
    p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override one stage's timeout (repeatable); defaults: "
                        + ", ".join(f"{k}={v}" for k, v in TIMEOUTS.items()))
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        _fail(f"--stages: unknown {','.join(bad)}; choose from {','.join(STAGES)}")
    if args.features is not None:
        args.features = [f for f in args.features.split(",") if f]
        bad = [f for f in args.features if f not in FEATURES]
        if bad or not args.features:
            _fail(f"--features: unknown {','.join(bad) or '(empty)'}; choose from {','.join(FEATURES)}")
    args.timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        name, _, secs = item.partition("=")
        try:
            if name not in STAGES or float(secs) <= 0:
                raise ValueError
            args.timeouts[name] = float(secs)
        except ValueError:
            _fail(f"--timeout {item}: want STAGE=SECONDS with STAGE one of {','.join(STAGES)} and SECONDS > 0")
    if args.wheels and not glob.glob(os.path.join(args.wheels, "*.whl")):
        _fail(f"--wheels {args.wheels}: no .whl files there (see --help for how to download megatron-core's)")
    if args.iters is not None and args.iters < 1:
        _fail("--iters must be >= 1")
    args.json = args.json or os.path.join(args.out, "gpu_check.json")
    return args


def print_table(report: dict) -> None:
    print("\n| stage | status | seconds | result |\n|---|---|---|---|")
    for s in report["stages"]:
        print(f"| {TITLES[s['name']]} | {s['status']} | {s['seconds']:.0f} | {s['summary']} |")
    d = report["facts"].get("cuda_device") or {}
    print(f"\n{d.get('name', 'no CUDA device')} | torch {report['facts']['torch']} (CUDA {report['facts']['torch_cuda']}) "
          f"| megatron-core {report['facts']['megatron_core']} | TE {report['facts']['transformer_engine']} "
          f"| total {report['seconds']:.0f} s | report {report['json']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    facts = gather_facts(args)
    ctx = Ctx(args, facts)
    end = t_start + args.budget
    report = {"tool": "tools/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "facts": facts,
              "budget_s": args.budget, "stages": [], "json": args.json}
    for name in args.stages:
        t0 = time.time()
        ctx.deadline = min(t0 + args.timeouts[name], end)
        print(f"gpu_check: {TITLES[name]} ...", flush=True)
        if ctx.left() <= 0:
            res = skipped(f"the {args.budget:.0f} s budget is spent")
        else:
            try:
                res = STAGE_FUNCS[name](ctx)
            except StageTimeout as exc:
                res = {"status": "timeout", "summary": str(exc), "results": None, "log": None}
            except Exception as exc:  # a broken stage is reported, and the next one runs
                res = failed(f"{type(exc).__name__}: {exc}")
        res = {"name": name, "title": TITLES[name], "seconds": round(time.time() - t0, 1), **res}
        report["stages"].append(res)
        print(f"gpu_check: {name}: {res['status']}: {res['summary']}", flush=True)
    report["seconds"] = round(time.time() - t_start, 1)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["stages"])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
