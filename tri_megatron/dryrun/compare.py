"""The dry run against ``tools/plan_layout.py``'s analytic memory model (``perf.layout_model``).

For each pipeline role of a dry run, the same figures from ``layout_model`` for the same layout:
parameters per GPU, weight / gradient / optimizer bytes (the dry run's come from megatron's padded
DDP buffers, so they may exceed the projection by the padding only), and the activations of one
micro-batch through the stage's decoder layers (the dry run's measurement minus what is saved from
the output layer on; the loss itself differs by design: the dry run runs megatron's unfused
cross entropy, the projection assumes the fused loss's fixed workspace).
"""

from __future__ import annotations

from typing import List


def layout_of(cfg):
    """plan_layout's Layout (perf.layout_model) of a run configuration."""
    from tri_megatron.perf import layout_model

    par, tr = cfg.parallel, cfg.training
    rc = tr.recompute_granularity
    return layout_model.Layout(tp=par.tp, pp=par.pp, vpp=par.model_chunks, cp=par.cp, dp=par.dp,
                               mbs=tr.micro_batch_size, recompute=rc if rc in ("full", "selective") else None,
                               sequence_parallel=par.sequence_parallel, distributed_optimizer=par.distributed_optimizer)


def compare(cfg, reports) -> List[dict]:
    from tri_megatron.perf import layout_model

    arch, layout = cfg.arch, layout_of(cfg)
    rows = []
    for r in reports:
        rank = r.pp_ranks[0]
        params = layout_model.rank_params(arch, layout, rank)
        opt_div = layout.dp * layout.cp if layout.distributed_optimizer else 1
        act = layout_model.activation_bytes(arch, cfg.training.seq_length, layout, rank)
        rows.append({
            "pp_ranks": r.pp_ranks,
            "params": (r.params, params),
            "weight_bytes": (r.weight_bytes, 2.0 * params),
            "grad_bytes": (r.grad_bytes, 4.0 * params),
            "optimizer_bytes": (r.optimizer_bytes, 12.0 * params / opt_div),
            "layer_activation_bytes": (r.activation_bytes - r.head_bytes, act["stage"]),
            "head_bytes": (r.head_bytes, act["head"]),
        })
    return rows


def format_comparison(rows: List[dict]) -> str:
    lines = ["| PP ranks | params: dry run / plan | weights | grads | optimizer | layer activations / micro-batch | "
             "head (loss) |", "|---|---|---|---|---|---|---|"]

    def ratio(pair):
        return f"{pair[0] / pair[1]:.4f}" if pair[1] else "-"

    for row in rows:
        ranks = row["pp_ranks"]
        name = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        lines.append(f"| {name} | {row['params'][0] / 1e9:.4f}B / {row['params'][1] / 1e9:.4f}B | "
                     + " | ".join(ratio(row[k]) for k in ("weight_bytes", "grad_bytes", "optimizer_bytes"))
                     + f" | {row['layer_activation_bytes'][0] / 2**30:.2f} / {row['layer_activation_bytes'][1] / 2**30:.2f} GiB "
                     f"({ratio(row['layer_activation_bytes'])}) | {row['head_bytes'][0] / 2**30:.2f} / "
                     f"{row['head_bytes'][1] / 2**30:.2f} GiB |")
    return "\n".join(lines)
