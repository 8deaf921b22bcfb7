#!/usr/bin/env python
"""Peak host memory (resident set) of checkpoint conversions, for models of several sizes, side by side.

    python tools/bench_convert_memory.py [--sizes 40M,160M,640M] [--work DIR] [--converter OTHER/convert_checkpoint.py]

Each size is the same width with more layers (hidden 768, GQA 12/4 heads, SwiGLU 2048, vocabulary
16,000, untied, fp32), so the largest single tensor (the embedding, 49 MB) and the largest layer stay
the same and any growth of the peak is a conversion holding more than it should. Per size:

1. a Hugging Face directory of random weights is synthesised (written tensor by tensor, one shard);
2. ``convert_checkpoint.py --from-hf HF MEG`` runs in its own process;
3. ``convert_checkpoint.py --to-hf MEG OUT`` runs in its own process (the command the background
   ``--export-hf-interval`` export runs);
4. OUT's safetensors and index must be byte-identical to HF's (the round trip is exact).

The peak is the child's ``ru_maxrss`` from ``wait4`` (the kernel's high-water mark of its resident set,
the largest of the process and any process it waited for). ``--converter`` also runs another
checkout's converter on the same inputs (e.g. ``git archive HEAD~1``), so old and new are measured in
one run. Memory, not time: on a loaded machine the seconds mean little and are not printed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")

WIDTH = dict(hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, num_query_groups=4, kv_channels=64,
             vocab_size=16000, mtp_num_layers=0, ssmax=False, untie_embeddings_and_output_weights=True,
             rotary_base=10000.0, norm_epsilon=1e-5, max_position_embeddings=512, no_rope_freq=None,
             window_size=None, window_attn_skip_freq=None, attn_temperature_tuning=False)


def param_counts(m: dict) -> tuple:
    """(parameters outside the decoder layers, parameters per decoder layer)."""
    h, f, d = m["hidden_size"], m["ffn_hidden_size"], m["kv_channels"]
    per_layer = (m["num_attention_heads"] + 2 * m["num_query_groups"]) * d * h + h * m["num_attention_heads"] * d \
        + 3 * h * f + 2 * h
    outside = m["vocab_size"] * h * (2 if m["untie_embeddings_and_output_weights"] else 1) + h
    return outside, per_layer


def model_for(size: str) -> dict:
    target = float(re.fullmatch(r"(\d+(?:\.\d+)?)([MG])", size.upper()).group(1)) * \
        {"M": 1e6, "G": 1e9}[size.upper()[-1]]
    outside, per_layer = param_counts(WIDTH)
    layers = max(1, round((target - outside) / per_layer))
    return dict(WIDTH, num_layers=layers)


def synthesize_hf(m: dict, out: str, seed: int = 0) -> int:
    """A Hugging Face directory (config.json + one safetensors shard) of random fp32 weights; returns bytes."""
    import torch

    from tri_megatron.convert.hf_config import hf_config_from_meta
    from tri_megatron.convert.hf_io import ShardWriter, TensorSpec
    from tri_megatron.convert.mapping import arch_of, expected_hf_shapes

    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config_from_meta(m, "float32"), f, indent=2)
    shapes = expected_hf_shapes(arch_of(m))
    writer = ShardWriter(out, 1 << 40, [TensorSpec(n, tuple(s), torch.float32) for n, s in shapes.items()])
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        writer.add(name, t + 1 if name.endswith("norm.weight") else t)
    writer.finish()
    return writer.total


def peak_rss(cmd: list, log: str, cwd: str = ROOT) -> int:
    """Run cmd in cwd; its peak resident set in bytes (wait4's ru_maxrss). Raises on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return usage.ru_maxrss * 1024


def same_files(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith(".safetensors") or n.endswith(".index.json"))
    return names == sorted(n for n in os.listdir(b) if n.endswith(".safetensors") or n.endswith(".index.json")) \
        and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def bench(sizes: list, work: str, converters: dict, keep: bool = False) -> list:
    import shutil

    rows = []
    for size in sizes:
        m = model_for(size)
        outside, per_layer = param_counts(m)
        params = outside + m["num_layers"] * per_layer
        hf = os.path.join(work, f"hf_{size}")
        nbytes = synthesize_hf(m, hf)
        largest = m["vocab_size"] * m["hidden_size"] * 4
        for label, script in converters.items():
            meg, out = os.path.join(work, f"meg_{size}_{label}"), os.path.join(work, f"out_{size}_{label}")
            log = os.path.join(work, f"{size}_{label}")
            repo = os.path.dirname(os.path.dirname(script))  # the converter's own checkout imports its package
            from_rss = peak_rss([sys.executable, script, "--from-hf", hf, meg, "--overwrite"], log + "_from.log", repo)
            to_rss = peak_rss([sys.executable, script, "--to-hf", meg, out, "--overwrite"], log + "_to.log", repo)
            rows.append(dict(size=size, layers=m["num_layers"], params=params, weight_bytes=nbytes,
                             largest_tensor=largest, converter=label, from_hf=from_rss, to_hf=to_rss,
                             exact=same_files(hf, out)))
            print(json.dumps(rows[-1]), flush=True)
            if not keep:
                shutil.rmtree(meg, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        if not keep:
            shutil.rmtree(hf, ignore_errors=True)
    return rows


def table(rows: list) -> str:
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    lines = ["| model | layers | fp32 weights | converter | `--from-hf` peak RSS | `--to-hf` peak RSS | round trip |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['params'] / 1e6:.0f}M | {r['layers']} | {mb(r['weight_bytes'])} | {r['converter']} | "
                     f"{mb(r['from_hf'])} | {mb(r['to_hf'])} | {'byte-identical' if r['exact'] else 'DIFFERS'} |")
    for label in dict.fromkeys(r["converter"] for r in rows):
        mine = [r for r in rows if r["converter"] == label]
        for key in ("from_hf", "to_hf"):
            lo, hi = min(r[key] for r in mine), max(r[key] for r in mine)
            lines.append(f"\n{label} {key}: largest / smallest peak = {hi / lo:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="40M,160M,640M", help="comma-separated parameter counts (M or G)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--converter", default=None, help="another convert_checkpoint.py to measure side by side")
    p.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    args = p.parse_args(argv)
    for size in args.sizes.split(","):
        if not re.fullmatch(r"\d+(\.\d+)?[MG]", size.strip().upper()):
            p.error(f"--sizes: {size!r} is not a parameter count like 40M or 1.5G")
    if args.converter and not os.path.isfile(args.converter):
        p.error(f"--converter {args.converter}: no such file")
    converters = {"this": CONVERT}
    if args.converter:
        converters["other"] = os.path.abspath(args.converter)
    work = args.work or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    rows = bench([s.strip().upper() for s in args.sizes.split(",")], work, converters, args.keep)
    print(table(rows))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
