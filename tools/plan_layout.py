#!/usr/bin/env python
"""Project memory per GPU, communication, pipeline bubble and MFU for every layout of a Tri preset
on a cluster, and rank them. A PROJECTION from an analytic model, not a measurement.

    python tools/plan_layout.py --model tri-21b --gpus 512                  # H100, defaults
    python tools/plan_layout.py --model tri-70b --gpus 512 --seq-length 8192 --calibration bench.json

For each layout (TP x CP x PP x VPP x DP, micro-batch size, recomputation none / selective / full)
that megatron-core and tri_megatron accept: memory per GPU (weights, fp32 gradients, distributed
optimizer state, activations of the micro-batches 1F1B keeps in flight, overhead), the busiest
pipeline rank's compute time, TP / CP / PP / DP communication on the given bandwidths, the pipeline
bubble and the optimizer step -> iteration time, tokens/s per GPU, MFU and HFU (Megatron FLOP
convention, dense bf16 peak). The model and its assumptions are in
``tri_megatron/perf/layout_model.py``.

The compute term's one free number, the fraction of peak a GPU reaches on its shard's forward +
backward, comes from ``bench_mfu.py --json`` results (``--calibration``; proxy runs of the layout in
question match best) and is 0.60 otherwise (``--compute-efficiency`` to set it). Results from
another device type are ignored unless ``--allow-calibration-from-other-devices``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tri_megatron.perf import layout_model  # noqa: E402
from tri_megatron.perf.devices import GPU_SPECS  # noqa: E402
from tri_megatron.perf.flops import model_flops_per_token  # noqa: E402
from tri_megatron.config.presets import PRESETS, get_preset  # noqa: E402

TRI_TEAM_REFERENCE = {
    "mfu": 0.43, "hfu": 0.47, "gpus": 512, "gpu": "H100",
    "note": "as reported by the Tri team (Trillion Labs) for 512 H100s; their FLOP convention, model, "
            "sequence length and batch are not stated with the figure",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan_layout.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-type", choices=sorted(GPU_SPECS), default="h100")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-node-bw", type=float, default=None,
                   help="achievable NCCL bus bandwidth inside a node, GB/s per GPU (default: per GPU type, H100 360)")
    p.add_argument("--inter-node-bw", type=float, default=None,
                   help="achievable bus bandwidth across nodes, GB/s per GPU (default 40: one 400 Gb/s NIC per GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the GPU type's)")
    p.add_argument("--memory-gib", type=float, default=None, help="device memory (default: the GPU type's)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's context length")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences (default: --global-batch-tokens / seq)")
    p.add_argument("--global-batch-tokens", type=int, default=4 * 2**20)
    p.add_argument("--mtp-num-layers", type=int, default=0)
    p.add_argument("--calibration", nargs="+", default=[], help="bench_mfu.py --json result files")
    p.add_argument("--allow-calibration-from-other-devices", action="store_true")
    p.add_argument("--compute-efficiency", type=float, default=None,
                   help="fraction of peak on the shard's forward+backward (overrides calibration; default 0.60)")
    p.add_argument("--tp-comm-exposed", type=float, default=1.0, help="fraction of TP communication not overlapped")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--pp", type=int, nargs="+", default=None, help="default: every divisor of the layers up to 16")
    p.add_argument("--vpp", type=int, nargs="+", default=None, help="default: 1..10 where they divide")
    p.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--recompute", nargs="+", choices=["none", "selective", "full"], default=["none", "selective", "full"])
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--no-overlap", action="store_true", help="no DP gradient / parameter overlap")
    p.add_argument("--unfused-loss", action="store_true", help="full logits in memory (no fused MTP loss kernel)")
    p.add_argument("--top", type=int, default=10, help="rows in the printed table")
    p.add_argument("--json", default=None, help="write the ranked projection to PATH")
    p.add_argument("--json-top", type=int, default=100, help="layouts kept in the JSON (0 = all)")
    return p


# -------------------------------------------------------------------------------- calibration --
def load_calibrations(paths) -> list:
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for item in data if isinstance(data, list) else [data]:
            cal = item.get("calibration")
            if cal and cal.get("compute_efficiency"):
                out.append(dict(cal, file=path))
    return out


def _device_matches(cal: dict, gpu_type: str) -> bool:
    return gpu_type.lower() in str(cal.get("device_name", "")).lower()


class EfficiencyPicker:
    """Compute efficiency for a layout: exact bench_mfu match, else same model, else any, else default."""

    def __init__(self, cals: list, model: str, seq: int, gpu_type: str, allow_other: bool, override, default=0.60):
        self.cals = [c for c in cals if allow_other or _device_matches(c, gpu_type)]
        self.ignored = len(cals) - len(self.cals)
        self.model, self.seq, self.override, self.default = model, seq, override, default

    def __call__(self, layout: layout_model.Layout) -> tuple:
        if self.override is not None:
            return self.override, "--compute-efficiency"
        exact = [c for c in self.cals if c["model"] == self.model and c["tp"] == layout.tp
                 and c["micro_batch_size"] == layout.mbs and c["seq_length"] == self.seq]
        same_model = [c for c in self.cals if c["model"] == self.model]
        for group, label in ((exact, "bench_mfu: same model, TP, micro-batch, sequence"),
                             (same_model, "bench_mfu: same model, other layout (median)"),
                             (self.cals, "bench_mfu: other models (median)")):
            if group:
                return statistics.median(c["compute_efficiency"] for c in group), f"{label}, {len(group)} result(s)"
        return self.default, "default assumption 0.60 (no bench_mfu calibration)"


# -------------------------------------------------------------------------------------- plan --
def plan(args) -> dict:
    arch = get_preset(args.model).arch.replace(mtp_num_layers=args.mtp_num_layers)
    seq = args.seq_length or arch.context_length
    gbs = args.global_batch_size or max(1, args.global_batch_tokens // seq)
    gpu = GPU_SPECS[args.gpu_type]
    gpu = dataclasses.replace(gpu, peak_tflops=args.peak_tflops or gpu.peak_tflops,
                              memory_gib=args.memory_gib or gpu.memory_gib)
    base = layout_model.Assumptions(gpus_per_node=args.gpus_per_node, intra_busbw_gbps=args.intra_node_bw,
                                    inter_busbw_gbps=args.inter_node_bw, tp_comm_exposed=args.tp_comm_exposed)
    cals = load_calibrations(args.calibration)
    pick = EfficiencyPicker(cals, args.model, seq, args.gpu_type, args.allow_calibration_from_other_devices,
                            args.compute_efficiency)
    recomputes = tuple(None if r == "none" else r for r in args.recompute)
    cands = layout_model.candidate_layouts(arch, seq, args.gpus, gbs, args.gpus_per_node, tps=tuple(args.tp),
                                           cps=tuple(args.cp), mbss=tuple(args.mbs), recomputes=recomputes)
    if arch.attn_temperature_tuning or arch.ssmax:
        # query scaling (Tri-70B's temperature tuning, SSMax) has no context-parallel path yet: pretrain_tri.py
        # rejects CP > 1 for it (found by the dry run of plan_layout's top layouts)
        cands = [c for c in cands if c.cp == 1]
    if args.pp:
        cands = [c for c in cands if c.pp in args.pp]
    if args.vpp:
        cands = [c for c in cands if c.vpp in args.vpp]
    results = []
    for c in cands:
        c = dataclasses.replace(c, sequence_parallel=not args.no_sequence_parallel,
                                distributed_optimizer=not args.no_distributed_optimizer,
                                overlap_grad_reduce=not args.no_overlap, overlap_param_gather=not args.no_overlap,
                                fused_loss=not args.unfused_loss)
        eff, source = pick(c)
        r = layout_model.project(arch, seq, c, gbs, gpu, dataclasses.replace(base, compute_efficiency=eff,
                                                                             compute_efficiency_source=source))
        r["compute_efficiency_source"] = source
        results.append(r)
    ranked = layout_model.rank_layouts(results)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    a = dataclasses.asdict(base)
    a.pop("compute_efficiency")
    a.pop("compute_efficiency_source")
    a["intra_busbw_gbps"] = args.intra_node_bw or gpu.intra_busbw_gbps
    a["inter_busbw_gbps"] = args.inter_node_bw or gpu.inter_busbw_gbps
    return {
        "tool": "plan_layout",
        "projection": True,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(x) for x in ["tools/plan_layout.py", *sys.argv[1:]]),
        "model": {"name": args.model, "parameters": arch.num_parameters(),
                  "seq_length": seq, "global_batch_size": gbs, "tokens_per_iteration": gbs * seq,
                  "mtp_num_layers": args.mtp_num_layers,
                  "model_flops_per_token": model_flops_per_token(arch, seq),
                  "model_flops_per_token_full_attention": model_flops_per_token(arch, seq, "full")},
        "cluster": {"gpus": args.gpus, "gpu_type": args.gpu_type, "gpu": gpu.name, "peak_tflops": gpu.peak_tflops,
                    "memory_gib": gpu.memory_gib, "hbm_tbps": gpu.hbm_tbps, "gpus_per_node": args.gpus_per_node},
        "assumptions": a,
        "calibration": {"files": args.calibration, "results_used": len(pick.cals),
                        "results_ignored_other_device": pick.ignored, "override": args.compute_efficiency},
        "flops_convention": "Megatron-LM (causal attention halved), dense bf16 peak",
        "reference": TRI_TEAM_REFERENCE,
        "candidates_evaluated": len(ranked),
        "candidates_fitting": sum(r["fits"] for r in ranked),
        "layouts": ranked,
    }


def pretrain_flags(res: dict, r: dict) -> list:
    """pretrain_tri.py flags for a ranked layout ``r`` of ``res`` (mock data): e.g. for ``--dry-run``."""
    m = res["model"]
    flags = ["--model", m["name"], "--bf16", "--mock-data", "--seq-length", str(m["seq_length"]),
             "--max-position-embeddings", str(m["seq_length"]), "--global-batch-size", str(m["global_batch_size"]),
             "--micro-batch-size", str(r["micro_batch_size"]), "--tensor-model-parallel-size", str(r["tp"]),
             "--pipeline-model-parallel-size", str(r["pp"]), "--context-parallel-size", str(r["cp"]),
             "--train-iters", "10"]
    if r["vpp"] > 1:
        flags += ["--virtual-pipeline-model-parallel-size", str(r["vpp"])]
    if r["sequence_parallel"]:
        flags.append("--sequence-parallel")
    if r["distributed_optimizer"]:
        flags += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    if r["recompute"] == "full":
        flags += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif r["recompute"] == "selective":
        flags += ["--recompute-granularity", "selective"]
    if m["mtp_num_layers"]:
        flags += ["--mtp-num-layers", str(m["mtp_num_layers"])]
    return flags


def print_table(res: dict, top: int) -> None:
    m, c = res["model"], res["cluster"]
    print(f"plan_layout (PROJECTION, not a measurement): {m['name']} ({m['parameters'] / 1e9:.2f}B) on {c['gpus']} x "
          f"{c['gpu']} | seq {m['seq_length']} | GBS {m['global_batch_size']} ({m['tokens_per_iteration'] / 2**20:.1f}M "
          f"tokens) | {m['model_flops_per_token'] / 1e9:.1f} GFLOP/token (Megatron convention)")
    a = res["assumptions"]
    print(f"  bandwidth: intra-node {a['intra_busbw_gbps']:.0f} GB/s, inter-node {a['inter_busbw_gbps']:.0f} GB/s per GPU; "
          f"{res['candidates_fitting']}/{res['candidates_evaluated']} layouts fit in 95% of {c['memory_gib']:.1f} GiB")
    head = (f"  {'#':>3} {'layout':<34} {'mem GiB':>8} {'bubble':>7} {'TP comm':>8} {'DP exp.':>8} {'iter s':>7} "
            f"{'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'HFU':>6} {'eff':>5}")
    print(head)
    for r in res["layouts"][:top]:
        t = r["times"]
        print(f"  {r['rank']:>3} {r['layout']:<34} {r['memory']['total_gib']:>8.1f} {100 * t['bubble_fraction']:>6.1f}% "
              f"{t['tp_comm_s']:>8.3f} {t['dp_comm_exposed_s']:>8.3f} {t['iteration_s']:>7.3f} "
              f"{r['tokens_per_s_per_gpu']:>10.0f} {r['model_tflops_per_gpu']:>8.1f} {100 * r['mfu']:>5.1f}% "
              f"{100 * r['hfu']:>5.1f}% {r['compute_efficiency']:>5.2f}" + ("" if r["fits"] else "  (does not fit)"))
    ref = res["reference"]
    print(f"  reference: Tri team, {ref['gpus']} x {ref['gpu']}: MFU ~{100 * ref['mfu']:.0f}%, HFU ~{100 * ref['hfu']:.0f}% "
          f"(convention not stated)")
    if res["layouts"]:
        print(f"  compute efficiency: {res['layouts'][0]['compute_efficiency_source']}")
    sys.stdout.flush()


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.gpus < 1:
        print("plan_layout.py: error: --gpus must be >= 1", file=sys.stderr)
        sys.exit(2)
    res = plan(args)
    if not res["layouts"]:
        print(f"plan_layout.py: error: no layout of {args.model} divides {args.gpus} GPUs with global batch "
              f"{res['model']['global_batch_size']}; change --gpus or --global-batch-size", file=sys.stderr)
        sys.exit(2)
    print_table(res, args.top)
    if args.json:
        out = dict(res)
        if args.json_top:
            out["layouts"] = res["layouts"][:args.json_top]
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return res


if __name__ == "__main__":
    main()
