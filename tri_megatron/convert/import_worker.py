"""One rank of ``--from-hf``: build the Tri model at the target layout, fill it from HF safetensors, save.

Run by ``from_hf.run_worker`` under torchrun (``python -m tri_megatron.convert.import_worker JOB.json``).
Each rank reads only the HF tensors its parameters need and slices its tensor-parallel shard.
"""

from __future__ import annotations

import json
import sys
import warnings


def main(job_path: str) -> None:
    warnings.filterwarnings("ignore")
    with open(job_path) as f:
        job = json.load(f)
    from tri_megatron.convert.hf_io import HFCheckpoint
    from tri_megatron.convert.mapping import ModelDims, hf_to_canonical
    from tri_megatron.convert.megatron_runtime import args_from_meta, build_chunks, fill_from_canonical
    from tri_megatron.training import checkpointing
    from tri_megatron.training.distributed import destroy_distributed, init_distributed

    m = job["meta"]
    args = args_from_meta(m, job["tp"], job["pp"], job["vpp"], bf16=job["bf16"])
    init_distributed(args)
    try:
        chunks, _ = build_chunks(args, init=False)
        hf, dims = HFCheckpoint(job["hf_dir"]), ModelDims(m)

        def get(name):  # a tied source has no lm_head: the output layer starts as the embedding
            return hf.get("model.embed_tokens.weight" if name == "lm_head.weight" and job.get("tied") else name)

        fill_from_canonical(chunks, lambda name: hf_to_canonical(name, get, dims))
        checkpointing.save_checkpoint(job["save"], 0, chunks, None, None, 0, args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
