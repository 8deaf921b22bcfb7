#!/usr/bin/env python
"""Convert checkpoints between megatron-core (distributed, any layout) and Hugging Face.

    python tools/convert_checkpoint.py --to-hf CKPT_DIR OUT_DIR [--dtype auto|bf16|fp32] [--drop-mtp]
        [--tokenizer PATH] [--max-shard-size 5GB] [--verify] [--overwrite]
    python tools/convert_checkpoint.py --from-hf HF_DIR OUT_DIR --target-tp T --target-pp P
        [--target-vpp V] [--dtype auto|bf16|fp32] [--keep-progress] [--verify] [--overwrite]

CKPT_DIR is a --save directory (its newest complete iteration is used) or one iter_NNNNNNN directory.
--to-hf ships the tokenizer the trainer recorded in the --save directory (or --tokenizer). A Llama
export keeps its MTP modules in mtp-*.safetensors (mtp.safetensors.index.json), which transformers and
vLLM do not read; --drop-mtp leaves them out. --from-hf --keep-progress continues at the iteration and
consumed samples the export records (its data order and learning-rate schedule) instead of iteration 0.
Runs on CPU (GPUs are hidden). Exit codes: 0 done, 1 --verify found the logits apart, 2 bad input
(nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion and verification are CPU work
import warnings  # noqa: E402

warnings.filterwarnings("ignore")  # megatron-core warns at import about optional fused kernels
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"), help="megatron -> Hugging Face")
    mode.add_argument("--from-hf", nargs=2, metavar=("HF_DIR", "OUT_DIR"), help="Hugging Face -> megatron")
    p.add_argument("--target-tp", type=int, default=1, help="--from-hf: tensor-parallel size of the result")
    p.add_argument("--target-pp", type=int, default=1, help="--from-hf: pipeline-parallel size of the result")
    p.add_argument("--target-vpp", type=int, default=None, help="--from-hf: virtual pipeline stages")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="dtype of the written weights (auto: the source's)")
    p.add_argument("--drop-mtp", action="store_true", help="--to-hf: leave the MTP modules out")
    p.add_argument("--keep-progress", action="store_true",
                   help="--from-hf: keep the iteration and consumed samples the export records (config.json "
                        "\"tri_megatron\"): training continues its data order and learning-rate schedule")
    p.add_argument("--tokenizer", default=None,
                   help="--to-hf: tokenizer.json or its directory (default: one in the checkpoint directory)")
    p.add_argument("--max-shard-size", default="5GB", help="--to-hf: safetensors shard size")
    p.add_argument("--layernorm-1p", action="store_true", default=None,
                   help="--to-hf: the source stores zero-centred gammas (add 1); default from its metadata")
    p.add_argument("--verify", action="store_true", help="compare logits of both models on CPU; fail above the bound")
    p.add_argument("--verify-tol", type=float, default=1e-4, help="bound on max |Δlogit| (fp32)")
    p.add_argument("--verify-seq-len", type=int, default=None, help="tokens per sequence for --verify")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.keep_progress and not args.from_hf:
        parser.error("--keep-progress belongs to --from-hf (an export records its progress in config.json)")
    from tri_megatron.convert.hf_config import HFConfigError
    from tri_megatron.convert.megatron_ckpt import CheckpointError
    from tri_megatron.convert.verify import ParityError

    try:
        if args.to_hf:
            from tri_megatron.convert.to_hf import to_hf

            to_hf(*args.to_hf, dtype=args.dtype, drop_mtp=args.drop_mtp, tokenizer=args.tokenizer,
                  max_shard_size=args.max_shard_size, overwrite=args.overwrite, verify=args.verify,
                  verify_tol=args.verify_tol, verify_seq_len=args.verify_seq_len, zero_centered_gamma=args.layernorm_1p)
        else:
            from tri_megatron.convert.from_hf import from_hf

            from_hf(*args.from_hf, target_tp=args.target_tp, target_pp=args.target_pp, target_vpp=args.target_vpp,
                    dtype=args.dtype, overwrite=args.overwrite, verify=args.verify, verify_tol=args.verify_tol,
                    verify_seq_len=args.verify_seq_len, keep_progress=args.keep_progress)
    except ParityError as e:
        print(f"convert_checkpoint.py: verification failed: {e}; nothing written", file=sys.stderr)
        return 1
    except (CheckpointError, HFConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
