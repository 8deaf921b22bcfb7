#!/usr/bin/env python
"""Measure training throughput, MFU and HFU of a Tri preset and layout on this machine.

Two modes, both ``--warmup N`` untimed then ``--iters M`` timed iterations (median reported), then
``--breakdown-iters K`` more with synchronizing timers for the step-time breakdown (those perturb
GPU overlap, so they are kept out of the headline figures):

* **run** (default): the real training step (``tri_megatron.training.loop.Trainer``, megatron-core
  schedules, optimizer) on mock data, at the layout given by the usual flags, on as many processes
  as launched (``torchrun --nproc_per_node 8 tools/bench_mfu.py --model tri-7b --bf16 ...``).
* **per-GPU proxy** (``--proxy-gpus N``): the shard one GPU holds in an N-GPU layout (its pipeline
  stage's layers, 1/TP of heads / FFN / vocabulary, the layout's micro-batch size, sequence length
  and micro-batch count), built and stepped in one process, so one H100 measures the compute
  efficiency of e.g. tri-21b on 512 GPUs at TP=4 PP=4 DP=32. No communication and no pipeline
  bubble are modelled; see ``tri_megatron/training/proxy.py`` for exactly what is and is not.

Reported: tokens/s per GPU, model TFLOP/s per GPU, MFU and HFU against the chip's dense bf16 peak
(detected for H100/H200/B200/A100, ``--peak-tflops`` overrides; none on CPU unless given), MFU in
the PaLM convention too (attention not halved), peak memory (CUDA max allocated; max RSS on CPU),
and forward / backward / optimizer / exposed-communication times. FLOPs follow Megatron-LM's
convention (``tri_megatron/perf/flops.py``). ``--json PATH`` writes everything, including a
``calibration`` block that ``tools/plan_layout.py --calibration`` reads.

CPU smoke test: ``python tools/bench_mfu.py --model tri-tiny --warmup 1 --iters 2 --peak-tflops 1``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import sys
import time
import warnings
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

import torch  # noqa: E402

from tri_megatron.local_dist import free_port  # noqa: E402
from tri_megatron.perf.devices import detect_peak_tflops  # noqa: E402
from tri_megatron.perf.flops import (  # noqa: E402
    hardware_flops_per_iteration, model_flops_per_iteration,
)
from tri_megatron.training.proxy import STAGES  # noqa: E402

P2P_TIMERS = ("forward-recv", "backward-recv", "forward-send", "backward-send", "forward-send-forward-recv",
              "backward-send-backward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
              "forward-backward-send-forward-backward-recv")
GRAD_SYNC_TIMERS = ("all-grads-sync", "non-tensor-parallel-grads-all-reduce", "embedding-grads-all-reduce",
                    "conditional-embedder-grads-all-reduce")
BREAKDOWN_KEYS = ("step_s", "schedule_s", "forward_s", "backward_s", "pipeline_p2p_s", "grad_sync_s", "optimizer_s")


# ---------------------------------------------------------------------------------- arguments --
def build_parser():
    from tri_megatron.config.run import build_parser as training_parser

    p = training_parser()
    p.prog = "bench_mfu.py"
    p.description = "Measure tokens/s, TFLOP/s, MFU and HFU of a Tri preset and layout (mock data)."
    g = p.add_argument_group("benchmark")
    g.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    g.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    g.add_argument("--breakdown-iters", type=int, default=None,
                   help="iterations with synchronizing timers for the breakdown (default: --iters; 0: none)")
    g.add_argument("--json", default=None, help="write the results to PATH")
    g.add_argument("--proxy-gpus", type=int, default=None,
                   help="per-GPU proxy of this layout on N GPUs (DP = N / (TP x PP x CP)), run in one process")
    g.add_argument("--proxy-stage", choices=STAGES, default="last",
                   help="which pipeline rank's shard: first (embedding), middle, last (output layer, MTP, loss)")
    g.add_argument("--proxy-optimizer", choices=["emulated", "megatron"], default="emulated",
                   help="emulated: AdamW over this GPU's distributed-optimizer share (shard / (DP x CP) with "
                        "--use-distributed-optimizer, else the whole shard) without holding state for the rest; "
                        "megatron: megatron-core's optimizer over the whole shard (18 bytes/parameter)")
    g.add_argument("--proxy-microbatches", type=int, default=None,
                   help="micro-batches per proxy iteration (default: the layout's, GBS / (MBS x DP))")
    return p


def parse_args(argv=None):
    """The benchmark's options and the training flags (mock data, constant learning rate, as many
    iterations as it runs)."""
    args = build_parser().parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        _fail("--iters must be >= 1 and --warmup >= 0")
    if args.breakdown_iters is None:
        args.breakdown_iters = args.iters
    args.mock_data = True
    args.train_iters = args.warmup + args.iters + args.breakdown_iters
    args.lr_decay_style = "constant"
    return args


def run_config(args, world: int):
    """The RunConfig (tri_megatron.config) of the training flags on ``world`` GPUs; exit 2 on bad input."""
    from tri_megatron.config import ArgumentError
    from tri_megatron.config.run import config_from_namespace
    from tri_megatron.launcher import launch_env

    try:
        return config_from_namespace(args, world, launch_env()["rank"])
    except ArgumentError as e:
        _fail(str(e))


def _runtime(cfg):
    """The device decision (tri_megatron.runtime) for ``--device``; exit 2 when it cannot be honoured."""
    from tri_megatron.runtime import DeviceError, resolve
    from tri_megatron.launcher import launch_env

    try:
        return resolve(cfg.training.device, local_rank=launch_env()["local_rank"])
    except DeviceError as e:
        _fail(str(e))


def _model_flops(cfg, tokens: int, attention: str = "causal") -> float:
    return model_flops_per_iteration(cfg.arch, cfg.training.seq_length, tokens, attention)


def _hardware_flops(cfg, tokens: int) -> float:
    return hardware_flops_per_iteration(cfg.arch, cfg.training.seq_length, tokens, **cfg.training.recompute(),
                                        pp=cfg.parallel.pp, vpp=cfg.parallel.vpp)


def _fail(msg: str) -> None:
    print(f"bench_mfu.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------- measuring --
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncTimers:
    """megatron-core's ``config.timers`` interface: wall-clock totals by name, synchronizing the device."""

    def __init__(self):
        self.totals = defaultdict(float)
        self._started = {}

    def __call__(self, name, log_level=None):
        return _Timer(self, name)


class _Timer:
    def __init__(self, timers: SyncTimers, name: str):
        self.timers, self.name = timers, name

    def start(self, barrier=False):
        _sync()
        self.timers._started[self.name] = time.perf_counter()

    def stop(self, barrier=False):
        _sync()
        t0 = self.timers._started.pop(self.name, None)
        if t0 is not None:
            self.timers.totals[self.name] += time.perf_counter() - t0


def measure(step, warmup: int, iters: int, breakdown_iters: int, config, optimizer) -> dict:
    """Time ``step()``; the breakdown installs timers in megatron-core's config and around the optimizer."""
    for _ in range(warmup):
        step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    breakdown = None
    if breakdown_iters:
        timers = SyncTimers()
        config.timers = timers
        inner = optimizer.step

        def timed_optimizer_step(*a, **k):
            timers("optimizer").start()
            try:
                return inner(*a, **k)
            finally:
                timers("optimizer").stop()

        optimizer.step = timed_optimizer_step
        total = 0.0
        try:
            for _ in range(breakdown_iters):
                _sync()
                t0 = time.perf_counter()
                step()
                _sync()
                total += time.perf_counter() - t0
        finally:
            config.timers = None
            del optimizer.step  # back to the class's method
        t = {k: v / breakdown_iters for k, v in timers.totals.items()}
        breakdown = {
            "step_s": total / breakdown_iters,
            "schedule_s": t.get("forward-backward", 0.0),
            "forward_s": t.get("forward-compute", 0.0),
            "backward_s": t.get("backward-compute", 0.0),
            "pipeline_p2p_s": sum(t.get(k, 0.0) for k in P2P_TIMERS),
            "grad_sync_s": sum(t.get(k, 0.0) for k in GRAD_SYNC_TIMERS),
            "optimizer_s": t.get("optimizer", 0.0),
        }
    return {"times": times, "breakdown": breakdown}


def peak_memory() -> tuple:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss_process_lifetime"


def reduce_max(values: list) -> list:
    """Element-wise max over all ranks (the slowest / largest rank sets the figure)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def gather_ranks(values: list) -> list:
    """Every rank's values (a list per rank, in rank order)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [list(values)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.cpu().tolist() for x in out]


def finish_breakdown(b: dict) -> dict:
    """Derived fields: exposed communication (measurable part) and what the timers do not cover."""
    if b is None:
        return None
    b = dict(b)
    b["exposed_comm_s"] = b["pipeline_p2p_s"] + b["grad_sync_s"]
    b["other_s"] = b["step_s"] - (b["forward_s"] + b["backward_s"] + b["pipeline_p2p_s"] + b["grad_sync_s"]
                                  + b["optimizer_s"])
    b["note"] = ("means per iteration over the breakdown iterations, synchronizing timers, of the rank with the most "
                 "forward+backward compute (every rank's in per_rank). "
                 "forward/backward include the tensor-parallel collectives inside them (not separable without a "
                 "profiler) and recomputation; pipeline_p2p includes the waits of the pipeline bubble; grad_sync "
                 "is the exposed data-parallel gradient reduction (plus layer-norm / embedding gradient "
                 "all-reduces); optimizer includes the distributed optimizer's parameter all-gather and the "
                 "gradient-norm all-reduce; other is the rest of the step (loss reduction, zeroing, Python).")
    return b


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(world: int) -> dict:
    import megatron.core

    from tri_megatron.runtime import transformer_engine_available

    cuda = torch.cuda.is_available()
    return {
        "hostname": socket.gethostname(),
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "num_processes": world,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "transformer_engine": transformer_engine_available(),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------- reporting --
def metrics(tokens: float, flops_model: float, flops_hw: float, flops_full: float, gpus_sharing: int,
            step: float, peak) -> dict:
    """Per-GPU figures for ``tokens`` processed with these per-GPU FLOPs in ``step`` seconds."""
    model_tflops = flops_model / step / 1e12
    hw_tflops = flops_hw / step / 1e12
    full_tflops = flops_full / step / 1e12
    return {
        "step_time_s": step,
        "tokens_per_s_per_gpu": tokens / step / gpus_sharing,
        "model_tflops_per_gpu": model_tflops,
        "hardware_tflops_per_gpu": hw_tflops,
        "mfu": model_tflops / peak if peak else None,
        "hfu": hw_tflops / peak if peak else None,
        "mfu_full_attention": full_tflops / peak if peak else None,
    }


def print_table(result: dict) -> None:
    r, lay = result["results"], result["layout"]
    mode = result["mode"]
    title = (f"bench_mfu: {result['model']['name']} | {mode}"
             + (f" ({result['proxy']['description']})" if mode == "proxy" else "")
             + f" | TP={lay['tp']} PP={lay['pp']} VPP={lay['vpp']} CP={lay['cp']} DP={lay['dp']}"
             f" | mbs {lay['micro_batch_size']} gbs {lay['global_batch_size']} seq {lay['seq_length']}"
             f" | {result['machine']['device_name']} x{result['machine']['num_processes']}")
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a (no --peak-tflops)"  # noqa: E731
    rows = [
        (f"step time (median of {len(r['step_times_s'])})", f"{r['step_time_s']:.4f} s"),
        ("tokens/s per GPU", f"{r['tokens_per_s_per_gpu']:.1f}"),
        ("model TFLOP/s per GPU", f"{r['model_tflops_per_gpu']:.4f}"),
        ("hardware TFLOP/s per GPU", f"{r['hardware_tflops_per_gpu']:.4f}"),
        (f"MFU (Megatron, causal halved) vs peak {result['peak_tflops'] or 'n/a'} TFLOP/s", pct(r["mfu"])),
        ("HFU (with recomputation)", pct(r["hfu"])),
        ("MFU (PaLM, full attention)", pct(r["mfu_full_attention"])),
        (f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_gib']:.2f} GiB"),
    ]
    if mode == "proxy" and result["proxy"].get("pipeline_estimate"):
        pe = result["proxy"]["pipeline_estimate"]
        rows.append(("layout MFU est. (bubble, no comm)", pct(pe["mfu"])))
        rows.append(("layout memory est. (perf model)", f"{result['proxy']['estimated_layout_memory_gib']:.1f} GiB"))
    b = result.get("breakdown")
    if b:
        for key in ("forward_s", "backward_s", "optimizer_s", "pipeline_p2p_s", "grad_sync_s", "other_s"):
            rows.append((f"  {key[:-2].replace('_', ' ')} (breakdown)", f"{b[key]:.4f} s"))
    width = max(len(k) for k, _ in rows)
    print(title)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()


def base_result(cfg, args, mode: str, world: int, peak, peak_source) -> dict:
    arch, tr = cfg.arch, cfg.training
    return {
        "tool": "bench_mfu",
        "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "mode": mode,
        "machine": machine_info(world),
        "model": {
            "name": arch.name,
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
            "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.num_query_groups,
            "kv_channels": arch.kv_channels, "vocab_size": arch.vocab_size,
            "padded_vocab_size": arch.padded_vocab_size(), "mtp_num_layers": arch.mtp_num_layers,
            "window_size": arch.window_size, "parameters": arch.num_parameters(),
        },
        "peak_tflops": peak,
        "peak_source": peak_source,
        "flops_convention": "Megatron-LM num_floating_point_operations: 6 FLOPs per parameter-token of every GEMM, "
                            "causal attention halved, logits per head (main + MTP), padded vocabulary; "
                            "mfu_full_attention: PaLM/torchtitan (attention not halved)",
        "settings": {"warmup": args.warmup, "iters": args.iters, "breakdown_iters": args.breakdown_iters,
                     "bf16": tr.bf16, "recompute_granularity": tr.recompute_granularity,
                     "recompute_method": tr.recompute_method, "recompute_num_layers": tr.recompute_num_layers,
                     "transformer_impl": tr.transformer_impl},
    }


def _peak(cfg):
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops, "flag"
    detected = detect_peak_tflops()
    return detected, ("detected" if detected else None)


# ----------------------------------------------------------------------------------- run mode --
def run_layout(args) -> dict:
    from megatron.core import parallel_state

    from tri_megatron.launcher import launch_env

    from tri_megatron.training.distributed import destroy_distributed, init_distributed
    from tri_megatron.training.loop import Trainer
    from tri_megatron.training.mock_data import MockData

    world = launch_env()["world_size"]
    cfg = run_config(args, world)
    tr = cfg.training
    rt = _runtime(cfg)
    if world == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    env = init_distributed(cfg.parallel, tr.seed, rt)
    try:
        data = MockData(tr.seq_length, cfg.arch.vocab_size, tr.micro_batch_size, parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size(), tr.seed, config=cfg.data)
        trainer = Trainer(cfg, rt)
        it = ([data.train_iterator(0) for _ in trainer.model] if len(trainer.model) > 1 else data.train_iterator(0))
        m = measure(lambda: trainer.train_step(it), args.warmup, args.iters, args.breakdown_iters,
                    trainer.config, trainer.optimizer)
        mem, mem_kind = peak_memory()
        (mem,) = reduce_max([mem])
        b, per_rank = m["breakdown"], None
        if b is not None:  # one rank's breakdown, the one with the most compute, so that its parts add up
            per_rank = [dict(zip(BREAKDOWN_KEYS, v), rank=r)
                        for r, v in enumerate(gather_ranks([b[k] for k in BREAKDOWN_KEYS]))]
            b = max(per_rank, key=lambda x: x["forward_s"] + x["backward_s"])
        if env["rank"] != 0:
            return {}
        peak, peak_source = _peak(cfg)
        tokens = tr.tokens_per_iteration
        step = statistics.median(m["times"])
        res = base_result(cfg, args, "run", world, peak, peak_source)
        res["layout"] = _layout(cfg)
        flops = {
            "model_flops_per_iteration": _model_flops(cfg, tokens),
            "hardware_flops_per_iteration": _hardware_flops(cfg, tokens),
            "model_flops_per_iteration_full_attention": _model_flops(cfg, tokens, attention="full"),
            "model_flops_per_token": _model_flops(cfg, 1),
            "tokens_per_iteration": tokens,
        }
        res["flops"] = flops
        res["results"] = {
            **metrics(tokens, flops["model_flops_per_iteration"] / world, flops["hardware_flops_per_iteration"] / world,
                      flops["model_flops_per_iteration_full_attention"] / world, world, step, peak),
            "tokens_per_s": tokens / step,
            "step_times_s": m["times"],
            "peak_memory_gib": mem,
            "peak_memory_kind": mem_kind,
        }
        res["breakdown"] = finish_breakdown(b)
        if per_rank and len(per_rank) > 1:
            res["breakdown"]["per_rank"] = [finish_breakdown(x) for x in per_rank]
            for x in res["breakdown"]["per_rank"]:
                x.pop("note")
        res["calibration"] = _calibration(cfg, res, flops["hardware_flops_per_iteration"] / world, step, b,
                                          source="run")
        return res
    finally:
        destroy_distributed()


def _layout(cfg) -> dict:
    par, tr = cfg.parallel, cfg.training
    return {
        "tp": par.tp, "pp": par.pp, "vpp": par.model_chunks, "cp": par.cp, "dp": par.dp,
        "sequence_parallel": par.sequence_parallel, "distributed_optimizer": par.distributed_optimizer,
        "micro_batch_size": tr.micro_batch_size, "global_batch_size": tr.global_batch_size,
        "seq_length": tr.seq_length, "num_microbatches": cfg.num_microbatches,
        "gpus": par.world_size,
    }


def _calibration(cfg, res, hw_flops_per_gpu_iter, step, breakdown, source="run") -> dict:
    """The compute term plan_layout needs: hardware FLOPs / (forward + backward time) / peak."""
    peak = res["peak_tflops"]
    if breakdown and breakdown["forward_s"] + breakdown["backward_s"] > 0:
        compute_s, basis = breakdown["forward_s"] + breakdown["backward_s"], "forward+backward timers"
    else:
        compute_s, basis = step, "whole step (no breakdown)"
    lay = res["layout"]
    return {
        "source": source,
        "model": cfg.arch.name,
        "tp": lay["tp"], "pp": lay["pp"], "vpp": lay["vpp"], "cp": lay["cp"],
        "micro_batch_size": lay["micro_batch_size"], "seq_length": lay["seq_length"],
        "recompute": cfg.training.recompute_granularity, "bf16": cfg.training.bf16,
        "device": res["machine"]["device"], "device_name": res["machine"]["device_name"],
        "peak_tflops": peak,
        "compute_seconds_basis": basis,
        "hardware_tflops_per_gpu_compute": hw_flops_per_gpu_iter / compute_s / 1e12,
        "compute_efficiency": (hw_flops_per_gpu_iter / compute_s / 1e12 / peak) if peak else None,
    }


# --------------------------------------------------------------------------------- proxy mode --
def run_proxy(args) -> dict:
    from tri_megatron.perf import layout_model
    from tri_megatron.training.proxy import ProxyRunner, make_spec, proxy_config, shard_flops_per_token
    from tri_megatron.launcher import launch_env
    from tri_megatron.training.distributed import destroy_distributed, init_distributed

    if launch_env()["world_size"] != 1:
        _fail("--proxy-gpus runs the one-GPU shard in a single process; launch without torchrun")
    sp_requested = bool(args.sequence_parallel)  # the one-process proxy runs without parallelism
    cfg = run_config(args, args.proxy_gpus)
    tr = cfg.training
    try:
        spec = make_spec(cfg, args.proxy_stage, args.proxy_microbatches)
    except ValueError as e:
        _fail(str(e))
    pcfg = proxy_config(cfg, spec)
    rt = _runtime(cfg)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(pcfg.parallel, tr.seed, rt)
    try:
        shards = spec.dp * spec.cp if cfg.parallel.distributed_optimizer else 1
        runner = ProxyRunner(pcfg, spec, args.proxy_optimizer, optimizer_shards=shards)
        m = measure(runner.train_step, args.warmup, args.iters, args.breakdown_iters, runner.config, runner.optimizer)
        mem, mem_kind = peak_memory()
    finally:
        destroy_distributed()

    peak, peak_source = _peak(cfg)
    step = statistics.median(m["times"])
    per_token = shard_flops_per_token(cfg, spec)
    full_per_token = shard_flops_per_token(cfg, spec, attention="full")["model"]
    tokens_shard = spec.run_microbatches * spec.micro_batch_size * spec.seq_length
    res = base_result(cfg, args, "proxy", 1, peak, peak_source)
    res["layout"] = dict(_layout(cfg), sequence_parallel=sp_requested)
    res["flops"] = {
        "shard_model_flops_per_token": per_token["model"],
        "shard_hardware_flops_per_token": per_token["hardware"],
        "shard_model_flops_per_iteration": per_token["model"] * tokens_shard,
        "shard_hardware_flops_per_iteration": per_token["hardware"] * tokens_shard,
        "shard_model_flops_per_iteration_full_attention": full_per_token * tokens_shard,
        "model_flops_per_token": _model_flops(cfg, 1),
        "tokens_through_shard_per_iteration": tokens_shard,
    }
    gpus_sharing = spec.tp * spec.pp * spec.cp  # GPUs that split one token's work in the layout
    res["results"] = {
        **metrics(tokens_shard, per_token["model"] * tokens_shard, per_token["hardware"] * tokens_shard,
                  full_per_token * tokens_shard, gpus_sharing, step, peak),
        "step_times_s": m["times"],
        "peak_memory_gib": mem,
        "peak_memory_kind": mem_kind,
        "note": "one GPU's shard; tokens/s per GPU = tokens through the shard / step / (TP x PP x CP), i.e. as if "
                "every pipeline stage ran at this stage's speed with no communication and no bubble",
    }
    res["breakdown"] = finish_breakdown(m["breakdown"])
    # the layout's iteration: (m + (PP-1)/VPP) micro-batch slots of this stage, plus the optimizer step
    opt = m["breakdown"]["optimizer_s"] if m["breakdown"] else 0.0
    t_mb = (step - opt) / spec.run_microbatches
    t_layout = (spec.num_microbatches + (spec.pp - 1) / spec.vpp) * t_mb + opt
    total_model = _model_flops(cfg, tr.tokens_per_iteration)
    layout = layout_model.Layout(
        tp=spec.tp, pp=spec.pp, vpp=spec.vpp, cp=spec.cp, dp=spec.dp, mbs=spec.micro_batch_size,
        recompute=tr.recompute_granularity,
        sequence_parallel=sp_requested, distributed_optimizer=cfg.parallel.distributed_optimizer,
        fused_loss=bool(tr.fused_loss) if tr.fused_loss is not None else torch.cuda.is_available())
    est_mem = layout_model.memory_per_gpu(cfg.arch, tr.seq_length, layout, spec.num_microbatches, spec.rank)
    res["proxy"] = {
        "description": spec.describe(),
        "target_gpus": spec.target_gpus, "stage": spec.stage, "pipeline_rank": spec.rank,
        "layers": spec.layers, "pre_process": spec.pre_process, "post_process": spec.post_process,
        "shard": spec.shard, "built_vocab": runner.built_vocab, "shard_parameters": runner.params,
        "optimizer": runner.optimizer_kind, "optimizer_parameters": runner.optimizer_numel,
        "layout_microbatches": spec.num_microbatches, "run_microbatches": spec.run_microbatches,
        "sequence_parallel_requested": sp_requested,
        "modelled": "per-GPU GEMM shapes, core attention at per-GPU heads and full sequence, loss over the vocab "
                    "shard, MTP on the last stage, recomputation, precision, the optimizer step of this GPU's "
                    "share (emulated AdamW over shard/(DP x CP) with the distributed optimizer; or megatron-core's "
                    "over the whole shard)",
        "not_modelled": "TP/CP/PP/DP communication, pipeline bubble, sequence-parallel norm split, in-flight "
                        "micro-batch activations; the emulated optimizer holds no Adam state for the rest of the shard",
        "pipeline_estimate": {
            "microbatch_s": t_mb,
            "iteration_s": t_layout,
            "mfu": total_model / (spec.target_gpus * t_layout * peak * 1e12) if peak else None,
            "tokens_per_s_per_gpu": tr.tokens_per_iteration / spec.target_gpus / t_layout,
            "note": "every stage at this stage's speed, bubble (PP-1)/VPP micro-batch slots, the measured "
                    "optimizer step, no communication",
        },
        "estimated_layout_memory_gib": est_mem["total_gib"],
        "estimated_layout_memory": est_mem,
    }
    res["calibration"] = _calibration(cfg, res, per_token["hardware"] * tokens_shard, step, m["breakdown"],
                                      source="proxy")
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run_proxy(args) if args.proxy_gpus else run_layout(args)
    if res:
        print_table(res)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
