"""Analytic performance model of one training iteration for a layout: memory per GPU, compute,
TP / CP / PP / DP communication, pipeline bubble, optimizer, and the resulting MFU / HFU.

It is a **projection**, not a measurement. ``tools/plan_layout.py`` ranks layouts with it and
``tools/bench_mfu.py`` attaches its memory estimate to proxy runs; ``pretrain_tri.py --dry-run``
compares its measured memory with it. Every function takes the architecture (``ModelArch``) and,
where activations or FLOPs depend on it, the training sequence length. Pure Python (no torch
import), so planning runs in well under a second on any machine.

What it models, per GPU of a layout TP x CP x PP (x VPP) x DP on ``gpus_per_node``-GPU nodes
(megatron-core's rank order: TP innermost, then CP, then DP, PP outermost):

* compute: the hardware FLOPs of the busiest pipeline rank (``perf.flops.stage_flops_per_token``, its
  layers, plus embedding / output layer / MTP on the first / last rank) at ``compute_efficiency`` x
  the dense bf16 peak. ``compute_efficiency`` is the one calibrated number: the fraction of peak a
  GPU reaches on its shard's forward + backward (recomputation included), measured by
  ``bench_mfu --proxy-gpus``; default 0.60 when no measurement is given (an assumption: an 8192^3
  bf16 GEMM reached 0.81 of peak on our H100, and a layer adds attention, norms and elementwise work).
* TP: per layer and micro-batch two all-reduce-volume collectives forward, two backward, plus the
  backward all-gathers of sequence parallelism and the forward collectives of recomputed layers,
  over NVLink when TP fits in a node; fully exposed (tri_megatron has no TP/GEMM overlap yet).
* CP: ring attention passes K and V around the CP group (K, V and their gradients in backward);
  only the part longer than that layer's attention compute is exposed.
* PP: the stage boundary activation, sent forward and its gradient backward, once per model chunk;
  exposed. Bubble: ``(PP - 1) / VPP`` micro-batch slots of the mean stage time.
* DP: distributed optimizer's gradient reduce-scatter (fp32, as ``grad_reduce_in_fp32``) and bf16
  parameter all-gather over the DP x CP group; with overlap on, hidden behind the last micro-batch's
  backward / the first's forward except one 40M-parameter bucket.
* optimizer: Adam over this GPU's optimizer shard, HBM-bound (~34 bytes per parameter read/written).
* memory: bf16 weights + fp32 gradient buffer + fp32 master / Adam moments (divided by DP x CP with
  the distributed optimizer), activations of the micro-batches a rank holds in flight under 1F1B
  (interleaved: Megatron's warm-up count), stored activations per layer for flash attention
  (no s x s scores), SwiGLU and sequence parallelism (checked against ``pretrain_tri.py --dry-run``,
  which measures them on megatron's real chunks: within 2% per layer), plus a fixed overhead and fragmentation margin;
  a layout fits when that total is within 95% of the device memory.

Not modelled: stragglers, NCCL/network contention between concurrent collectives, kernel launch
overhead, data loading, checkpointing, uneven first/last stage splits.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tri_megatron.config.arch import ModelArch
from tri_megatron.perf.devices import GPUSpec
from tri_megatron.perf.flops import model_flops_per_token, recompute_flops_per_token, stage_flops_per_token

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    mbs: int = 1
    recompute: Optional[str] = None  # None | 'selective' | 'full' (uniform, 1 layer)
    sequence_parallel: bool = True  # with TP > 1
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    fused_loss: bool = True  # chunked fused MTP/output loss: no full logits in memory

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def recompute_dict(self) -> dict:
        if self.recompute == "full":
            return {"granularity": "full", "method": "uniform", "recompute_num_layers": 1}
        if self.recompute == "selective":
            return {"granularity": "selective"}
        return {}

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        parts += [f"DP{self.dp}", f"mbs{self.mbs}"]
        if self.recompute:
            parts.append(f"rc-{self.recompute}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.60
    compute_efficiency_source: str = "default assumption (no bench_mfu calibration)"
    gpus_per_node: int = 8
    intra_busbw_gbps: Optional[float] = None  # None: the GPU spec's
    inter_busbw_gbps: Optional[float] = None
    intra_latency_s: float = 10e-6
    inter_latency_s: float = 25e-6
    tp_comm_exposed: float = 1.0  # fraction of TP communication on the critical path
    hbm_efficiency: float = 0.7  # optimizer step: fraction of HBM bandwidth reached
    optimizer_bytes_per_param: float = 34.0
    bucket_params: float = 40e6  # DDP bucket (overlap_grad_reduce): the last one is exposed
    memory_overhead_gib: float = 3.0  # CUDA context, NCCL buffers, cuBLAS/attention workspaces
    fragmentation: float = 0.05  # allocator margin on top of tensors
    usable_memory_fraction: float = 0.95  # "fits" leaves 5% of the device for spikes the model does not see


# ---------------------------------------------------------------------------------- parameters --
def rank_params(arch: ModelArch, layout: Layout, rank: int) -> float:
    """Parameters held by one GPU of pipeline rank ``rank`` (its TP shard; untied embeddings). The
    norms' weights are replicated on every TP rank, the linear layers and the vocabulary split."""
    per_rank_layers = arch.num_layers // layout.pp
    h, v = arch.hidden_size, arch.padded_vocab_size()
    sharded = arch.layer_parameters() - 2 * h  # a layer without its two norms
    n = per_rank_layers * (sharded / layout.tp + 2 * h)
    if rank == 0:
        n += v * h / layout.tp  # embedding
    if rank == layout.pp - 1:
        n += v * h / layout.tp + h  # output layer, final norm
        # MTP: a layer, eh_proj (2h x h) and enorm / hnorm / final norm
        n += arch.mtp_num_layers * ((sharded + 2 * h * h) / layout.tp + 2 * h + 3 * h)
        if arch.mtp_num_layers and layout.pp > 1:
            n += v * h / layout.tp  # MTP embeds the shifted tokens: the last stage holds an embedding too
    return n


# -------------------------------------------------------------------------------------- memory --
def _act_bytes_per_token_layer(arch: ModelArch, layout: Layout) -> float:
    """Stored activations (bytes) per token of one layer, no recomputation, flash attention."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.q_size, arch.kv_size
    sp = layout.tp if layout.sp else 1
    # 2 norm inputs + 2 (sharded, with SP) linear inputs: 4h; attention: the QKV projection's output
    # (q + 2kv, kept alive by V, a view of it), the RoPE'd / scaled Q and K flash attention saves
    # (q + kv) and its output O (q) = 3q + 3kv (the dry run measured this; 2q + 2kv before);
    # SwiGLU: fc1 output (2f) and fc2 input (f). bf16.
    return 2.0 * (4 * h / sp + (3 * q + 3 * kv + 3 * f) / layout.tp)


def inflight_microbatches(layout: Layout, rank: int, num_microbatches: int) -> float:
    """Micro-batches of a whole stage whose activations rank ``rank`` holds at the 1F1B peak."""
    p, v, m = layout.pp, layout.vpp, num_microbatches
    if p == 1:
        return 1.0
    if v == 1:
        return float(min(m, p - rank))
    chunks = min(m * v, (p - rank - 1) * 2 + (v - 1) * p + 1)  # megatron's interleaved warm-up + 1
    return chunks / v


# the fused loss's tiling on a GPU (tri_megatron/ops/ce_chunks.py: TILE_BYTES, MIN_GRAD_CHUNK_ROWS;
# tests/test_bench_tools.py pins the two copies together)
FUSED_LOSS_TILE_BYTES = 64 * 2**20
FUSED_LOSS_MIN_CHUNK_ROWS = 2048


def fused_loss_workspace_bytes(arch: ModelArch, layout: Layout, tokens: float) -> float:
    """What the fused loss (tri_megatron/ops/fused_cross_entropy.py) holds beyond the head's stored inputs, for
    ``tokens`` tokens of one micro-batch (the full sequence of this CP rank): one bf16 logits tile during its
    forward (at least 2,048 token rows of ``V/tp``, or the whole micro-batch), one bf16 hidden-state gradient per
    head from forward to backward, and with SP the gathered (not sequence-split) head inputs it saves. The weight
    gradient goes into DDP's main_grad during the forward (counted in the gradient buffer)."""
    heads = 1 + arch.mtp_num_layers
    h = arch.hidden_size
    vocab = arch.padded_vocab_size(layout.tp) / layout.tp
    rows = min(tokens, max(FUSED_LOSS_TILE_BYTES // (2 * vocab), FUSED_LOSS_MIN_CHUNK_ROWS))
    sp = layout.tp if layout.sp else 1
    return 2.0 * rows * vocab + heads * 2.0 * h * tokens * (2.0 - 1.0 / sp)


def activation_bytes(arch: ModelArch, seq_length: int, layout: Layout, rank: int,
                     a: Assumptions = Assumptions()) -> dict:
    """Stored activations (bytes) of ONE micro-batch on a GPU of pipeline rank ``rank``: through all its
    layers ("stage"), the last stage's head (final norm, output layer input, MTP, loss workspace),
    and the transient of full recomputation (the layer being recomputed in backward)."""
    tokens = layout.mbs * seq_length / layout.cp
    h = arch.hidden_size
    sp = layout.tp if layout.sp else 1
    per_layer_full = _act_bytes_per_token_layer(arch, layout) * tokens
    per_layer_input = 2.0 * h / sp * tokens
    layers = arch.num_layers // layout.pp
    if layout.recompute == "full":
        stage, transient = layers * per_layer_input, per_layer_full
    else:  # selective (core attention) saves nothing with flash attention: Q, K, V, O stay stored
        stage, transient = layers * per_layer_full, 0.0
    head = 0.0
    if rank == layout.pp - 1:
        d = arch.mtp_num_layers
        head = 2.0 * 2 * h / sp * tokens  # final norm input, output-layer input
        head += d * (per_layer_full + 2.0 * 4 * h / sp * tokens)  # MTP layer + its norms / projection
        if layout.fused_loss:
            head += fused_loss_workspace_bytes(arch, layout, tokens)
        else:  # bf16 logits, fp32 copy and softmax kept for backward, per head
            head += (1 + d) * 10.0 * tokens * arch.padded_vocab_size() / layout.tp
    return {"stage": stage, "head": head, "transient": transient}


def memory_per_gpu(arch: ModelArch, seq_length: int, layout: Layout, num_microbatches: int, rank: int,
                   a: Assumptions = Assumptions()) -> dict:
    """Estimated peak memory (GiB) of one GPU of pipeline rank ``rank``."""
    params = rank_params(arch, layout, rank)
    weights = 2.0 * params
    grads = 4.0 * params  # fp32 main-grad buffer
    opt_div = layout.dp * layout.cp if layout.distributed_optimizer else 1
    optimizer = 12.0 * params / opt_div
    act = activation_bytes(arch, seq_length, layout, rank, a)
    activations = inflight_microbatches(layout, rank, num_microbatches) * act["stage"] + act["transient"] + act["head"]
    tensors = weights + grads + optimizer + activations
    total = tensors * (1 + a.fragmentation) + a.memory_overhead_gib * GIB
    return {
        "params_on_gpu": params,
        "weights_gib": weights / GIB,
        "grads_gib": grads / GIB,
        "optimizer_gib": optimizer / GIB,
        "activations_gib": activations / GIB,
        "overhead_gib": (total - tensors) / GIB,
        "total_gib": total / GIB,
    }


# ------------------------------------------------------------------------------------ timing --
def _bw(a: Assumptions, gpu: GPUSpec, group_span: int) -> tuple:
    """(bytes/s, latency) for a group whose ranks span ``group_span`` consecutive GPUs."""
    if group_span <= a.gpus_per_node:
        return (a.intra_busbw_gbps or gpu.intra_busbw_gbps) * 1e9, a.intra_latency_s
    return (a.inter_busbw_gbps or gpu.inter_busbw_gbps) * 1e9, a.inter_latency_s


def _allreduce_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * nbytes / bw + lat


def _gather_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    """all-gather or reduce-scatter of a tensor of nbytes (full size)."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + lat


def iteration_time(arch: ModelArch, seq_length: int, layout: Layout, global_batch: int, gpu: GPUSpec,
                   a: Assumptions = Assumptions()) -> dict:
    """Projected time of one iteration and its parts (seconds), with per-rank detail."""
    # Long because it is the whole analytic time model in one readable sequence (compute, TP/CP/PP
    # communication, bubble, DP gradient sync, optimizer): each term is a line or two.
    m = global_batch // (layout.mbs * layout.dp)
    p, v, tp, cp = layout.pp, layout.vpp, layout.tp, layout.cp
    peak = gpu.peak_tflops * 1e12 * a.compute_efficiency
    tokens = layout.mbs * seq_length / cp  # per GPU per micro-batch
    h = arch.hidden_size
    act_bytes = 2.0 * tokens * h  # one [s/cp, b, h] bf16 activation
    rc = layout.recompute_dict()

    tp_bw, tp_lat = _bw(a, gpu, tp)
    # span of a group = GPUs from its first to its last rank (megatron-core's order: TP, CP, DP, PP)
    cp_bw, cp_lat = _bw(a, gpu, tp * (cp - 1) + 1)
    pp_bw, pp_lat = _bw(a, gpu, tp * cp * layout.dp + 1)  # pipeline neighbours are tp*cp*dp ranks apart
    dp_bw, dp_lat = _bw(a, gpu, tp * (cp * layout.dp - 1) + 1)  # gradients sync over the DP x CP group

    per_rank = []
    for r in range(p):
        st = stage_flops_per_token(arch, seq_length, p, v, r, tp=tp, recompute=rc)
        compute = st["hardware"] * tokens / peak
        fwd_share = (st["model"] / 3.0) / st["hardware"] if st["hardware"] else 0.0
        n_layers = len(st["layers"]) + (arch.mtp_num_layers if st["post_process"] else 0)
        # TP: 2 AR-volume collectives forward, 2 backward, +1 AR-volume of SP backward all-gathers,
        # +2 per recomputed layer (full recomputation repeats the forward's).
        ar = _allreduce_time(act_bytes, tp, tp_bw, tp_lat)
        per_layer = 4 + (1 if layout.sp else 0) + (2 if layout.recompute == "full" else 0)
        tp_time = n_layers * per_layer * ar
        if st["post_process"]:
            tp_time += 2 * _gather_time(act_bytes, tp, tp_bw, tp_lat) if layout.sp else 0.0
        tp_time *= a.tp_comm_exposed
        # CP: ring exchange of K and V (bf16) forward, K, V, dK, dV backward; overlapped with attention.
        cp_time = 0.0
        if cp > 1:
            kv_bytes = 2.0 * tokens * 2 * arch.kv_size / tp
            comm_layer = (cp - 1) * (kv_bytes / cp_bw + cp_lat) * 3  # fwd 1x, bwd 2x
            attn_layer = 3.0 * st["breakdown"]["attention"] / max(n_layers, 1) * tokens / peak
            cp_time = n_layers * max(0.0, comm_layer - attn_layer)
        # PP: boundary activation forward and its gradient backward, once per chunk.
        pp_time = 0.0
        if p > 1:
            msg = act_bytes / (tp if layout.sp else 1)
            pp_time = v * 2 * (msg / pp_bw + pp_lat)
        per_rank.append({"rank": r, "compute_s": compute, "tp_comm_s": tp_time, "cp_comm_exposed_s": cp_time,
                         "pp_comm_s": pp_time, "microbatch_s": compute + tp_time + cp_time + pp_time,
                         "fwd_share": fwd_share})
    t_max = max(x["microbatch_s"] for x in per_rank)
    t_mean = sum(x["microbatch_s"] for x in per_rank) / p
    busiest = max(per_rank, key=lambda x: x["microbatch_s"])
    steady = m * t_max
    bubble = (p - 1) / v * t_mean if p > 1 else 0.0

    # DP (+CP) gradient / parameter synchronisation of the busiest rank's parameters.
    params = max(rank_params(arch, layout, r) for r in range(p))
    n_dp = layout.dp * cp
    if layout.distributed_optimizer:
        rs = _gather_time(4.0 * params, n_dp, dp_bw, dp_lat)
        ag = _gather_time(2.0 * params, n_dp, dp_bw, dp_lat)
    else:
        rs = _allreduce_time(4.0 * params, n_dp, dp_bw, dp_lat)
        ag = 0.0
    bucket_frac = min(1.0, a.bucket_params / max(params, 1.0))
    # the last micro-batch's backward / the first's forward, on the busiest rank
    bwd_mb = busiest["microbatch_s"] * (1 - busiest["fwd_share"])
    fwd_mb = busiest["microbatch_s"] * busiest["fwd_share"]
    dp_rs = max(rs * bucket_frac, rs - bwd_mb) if layout.overlap_grad_reduce else rs
    dp_ag = (max(ag * bucket_frac, ag - fwd_mb) if layout.overlap_param_gather else ag) if ag else 0.0
    opt_params = params / (n_dp if layout.distributed_optimizer else 1)
    optimizer = opt_params * a.optimizer_bytes_per_param / (gpu.hbm_tbps * 1e12 * a.hbm_efficiency)

    total = steady + bubble + dp_rs + dp_ag + optimizer
    return {
        "num_microbatches": m,
        "iteration_s": total,
        "pipeline_steady_s": steady,
        "bubble_s": bubble,
        "bubble_fraction": bubble / total,
        "compute_s": m * busiest["compute_s"],
        "tp_comm_s": m * busiest["tp_comm_s"],
        "cp_comm_exposed_s": m * busiest["cp_comm_exposed_s"],
        "pp_comm_s": m * busiest["pp_comm_s"],
        "dp_comm_exposed_s": dp_rs + dp_ag,
        "dp_comm_total_s": rs + ag,
        "optimizer_s": optimizer,
        "busiest_rank": busiest["rank"],
        "per_rank": per_rank,
    }


def project(arch: ModelArch, seq_length: int, layout: Layout, global_batch: int, gpu: GPUSpec,
            a: Assumptions = Assumptions()) -> dict:
    """Memory, time and MFU / HFU of one layout."""
    t = iteration_time(arch, seq_length, layout, global_batch, gpu, a)
    m = t["num_microbatches"]
    mems = [memory_per_gpu(arch, seq_length, layout, m, r, a) for r in sorted({0, layout.pp - 1})]
    mem = max(mems, key=lambda x: x["total_gib"])
    tokens = global_batch * seq_length
    model_flops = tokens * model_flops_per_token(arch, seq_length)
    rc = layout.recompute_dict()
    hw_flops = model_flops + tokens * recompute_flops_per_token(
        arch, seq_length, rc.get("granularity"), rc.get("method"), rc.get("recompute_num_layers"),
        layers_per_chunk=arch.num_layers // (layout.pp * layout.vpp))
    denom = layout.gpus * t["iteration_s"] * gpu.peak_tflops * 1e12
    per_rank = t.pop("per_rank")
    return {
        "layout": layout.name(),
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp,
        "micro_batch_size": layout.mbs, "num_microbatches": m, "recompute": layout.recompute,
        "sequence_parallel": layout.sp, "distributed_optimizer": layout.distributed_optimizer,
        "memory": mem,
        "fits": mem["total_gib"] <= gpu.memory_gib * a.usable_memory_fraction,
        "times": t,
        "model_flops_per_iteration": model_flops,
        "hardware_flops_per_iteration": hw_flops,
        "mfu": model_flops / denom,
        "hfu": hw_flops / denom,
        "model_tflops_per_gpu": model_flops / layout.gpus / t["iteration_s"] / 1e12,
        "tokens_per_s_per_gpu": tokens / layout.gpus / t["iteration_s"],
        "compute_efficiency": a.compute_efficiency,
        "per_rank_microbatch_s": [x["microbatch_s"] for x in per_rank],
    }


def candidate_layouts(arch: ModelArch, seq_length: int, gpus: int, global_batch: int, gpus_per_node: int = 8,
                      tps=(1, 2, 4, 8), cps=(1, 2, 4), max_pp: int = 16, max_vpp: int = 10, mbss=(1, 2, 4),
                      recomputes=(None, "selective", "full")) -> list:
    """Every layout megatron-core (and tri_megatron's validation) accepts for this model and cluster."""
    out = []
    vocab = arch.padded_vocab_size()
    for tp in tps:
        if tp > gpus_per_node or arch.num_attention_heads % tp or arch.num_query_groups % tp or vocab % tp:
            continue
        for cp in cps:
            if cp > 1 and (arch.mtp_num_layers or seq_length % (2 * cp)):
                continue
            for pp in range(1, min(max_pp, arch.num_layers) + 1):
                if arch.num_layers % pp or gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for vpp in range(1, max_vpp + 1):
                    if (arch.num_layers // pp) % vpp or (vpp > 1 and pp == 1):
                        continue
                    for mbs in mbss:
                        if cp > 1 and mbs > 1:  # CP splits sequences too long for one GPU: with micro-batch 1
                            continue
                        if global_batch % (mbs * dp):
                            continue
                        m = global_batch // (mbs * dp)
                        if vpp > 1 and m % pp:
                            continue
                        for rc in recomputes:
                            out.append(Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, mbs=mbs, recompute=rc))
    return out


def rank_layouts(results: list) -> list:
    """Fitting layouts first, by projected MFU; among equal MFU (to 0.01%) the simpler layout first."""
    return sorted(results, key=lambda r: (not r["fits"], -round(r["mfu"], 4), r["cp"], r["pp"] * r["vpp"], r["tp"],
                                          r["recompute"] is not None, r["micro_batch_size"]))
