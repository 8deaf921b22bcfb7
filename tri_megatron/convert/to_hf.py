"""megatron-core distributed checkpoint -> Hugging Face directory (``convert_checkpoint.py --to-hf``).

Reads the checkpoint in this one process (any TP/PP/VPP layout), plans every HF tensor first (the
mapping on meta tensors), then streams canonical tensors layer by layer through the name/layout
mapping into sharded safetensors, each tensor written at its offset and released (host memory: about
one layer or the embedding, whatever the model or shard size), and writes config.json,
generation_config.json, the tokenizer files when there is a tokenizer (--tokenizer, else the one the
trainer recorded in the --save directory), and for Tri / Trillion configs ``modeling_tri.py`` +
``configuration_tri.py``. Everything is written into a staging directory beside OUT_DIR and renamed
into place only when complete (and verified, with --verify), so a failure writes nothing.

Ready to serve: config.json and generation_config.json always state bos/eos/pad ids (the tokenizer's;
null without one, never transformers' Llama defaults 1/2), tokenizer_config.json's ``model_max_length``
is the context length, and config.json's "tri_megatron" block records the source iteration, consumed
samples/tokens and layout (``--from-hf --keep-progress`` continues from them). A Llama export's MTP
modules (``model.layers.{L+j}.*``, DeepSeek-V3 names) go to ``mtp-*.safetensors`` under their own
``mtp.safetensors.index.json``: transformers and vLLM read only the files ``model.safetensors.index.json``
names, so LlamaForCausalLM loads with no unexpected key and vLLM's strict loader never sees them, while
``--from-hf`` and ``--verify`` read both indexes. Tri / Trillion exports keep them in the main index:
their modeling code has the MTP layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import List, Optional, Tuple

import torch

from tri_megatron.convert.hf_config import export_flavour, hf_config_from_meta
from tri_megatron.convert.hf_io import (DTYPE_NAMES, DTYPES, MTP_INDEX, NO_SPECIAL_IDS, ShardWriter, TensorSpec,
                                        copy_tokenizer, find_tokenizer, parse_size, return_freed_memory)
from tri_megatron.convert.mapping import canonical_to_hf, expected_hf_shapes
from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint

HF_MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
REMOTE_CODE_FILES = ("configuration_tri.py", "modeling_tri.py")


def staging_dir(out_dir: str, overwrite: bool) -> str:
    """A fresh staging directory beside out_dir (refusing to replace a non-empty out_dir unless asked)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite or choose another OUT_DIR")
    tmp = out_dir.rstrip("/") + "_staging"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, out_dir: str) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
    os.replace(tmp, out_dir)


def separate_mtp(m: dict) -> bool:
    """Whether the export keeps its MTP modules out of model.safetensors.index.json (a Llama export)."""
    return export_flavour(m) == "llama"


def export_plan(ckpt: MegatronCheckpoint, dtype: torch.dtype,
                drop_mtp: bool) -> Tuple[List[TensorSpec], List[TensorSpec]]:
    """Every HF tensor of the export (name, shape, dtype) in the order write_hf produces them, as (the
    model index's, the separate MTP index's): the mapping run on meta tensors, nothing read. Checked
    against the architecture's expected names."""
    apart = separate_mtp(ckpt.model)
    main, mtp = [], []
    for name, t in ckpt.iter_canonical(meta=True):
        for hf_name, ht in canonical_to_hf(name, t, ckpt.arch, drop_mtp=drop_mtp):
            (mtp if apart and name.startswith("mtp.") else main).append(TensorSpec(hf_name, tuple(ht.shape), dtype))
    expected = expected_hf_shapes(ckpt.arch, drop_mtp)
    got = {s.name: s.shape for s in main + mtp}
    if got != {k: tuple(v) for k, v in expected.items()}:  # a mapping bug, never a user error
        raise AssertionError(f"export plans {sorted(set(got.items()) ^ set(expected.items()))[:5]} unexpectedly")
    return main, mtp


def write_hf(ckpt: MegatronCheckpoint, out: str, dtype: Optional[torch.dtype], drop_mtp: bool,
             tokenizer: Optional[str], max_shard_size: int) -> dict:
    """Write the HF files for ckpt into the (existing, empty) directory out; returns a summary.

    Streams: one checkpoint region (a decoder layer, the embedding, ...) is read, mapped, and each HF
    tensor written at its planned offset and released before the next is read."""
    m = ckpt.model
    dtype = dtype or ckpt.dtype
    main, mtp = export_plan(ckpt, dtype, drop_mtp)
    writer = ShardWriter(out, max_shard_size, main)
    mtp_writer = ShardWriter(out, max_shard_size, mtp, prefix="mtp") if mtp else None
    try:
        for name, t in ckpt.iter_canonical():
            w = mtp_writer if mtp_writer and name.startswith("mtp.") else writer
            for hf_name, ht in canonical_to_hf(name, t, ckpt.arch, drop_mtp=drop_mtp):
                w.add(hf_name, ht.to(dtype))
            del t
        weight_map = writer.finish()
        mtp_map = mtp_writer.finish() if mtp_writer else {}
    finally:
        writer.close()
        if mtp_writer:
            mtp_writer.close()
    root = os.path.dirname(ckpt.path)
    tok = find_tokenizer(tokenizer, ckpt.path, root)
    max_len = m.get("max_position_embeddings") or m.get("seq_length")
    special = copy_tokenizer(tok, out, max_len) if tok else dict(NO_SPECIAL_IDS)
    consumed = ckpt.meta.get("consumed_samples")
    source = {"iteration": ckpt.meta.get("iteration"), "consumed_samples": consumed,
              "seq_length": m.get("seq_length"),
              "consumed_tokens": consumed * m["seq_length"] if consumed is not None and m.get("seq_length") else None,
              "layout": ckpt.meta.get("layout"), "preset": m.get("model")}
    if mtp_map:
        source["mtp_index"] = MTP_INDEX
    cfg = hf_config_from_meta(m, DTYPE_NAMES[dtype], drop_mtp, special, source)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = {"_from_model_config": True, **special}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    flavour = export_flavour(m)
    if flavour != "llama":
        for fname in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(HF_MODELING_DIR, fname), os.path.join(out, fname))
    return {"flavour": flavour, "model_type": cfg["model_type"], "tensors": len(weight_map) + len(mtp_map),
            "shards": len(set(weight_map.values())) + len(set(mtp_map.values())), "bytes": writer.total
            + (mtp_writer.total if mtp_writer else 0), "dtype": DTYPE_NAMES[dtype],
            "tokenizer": tok, "mtp_layers": cfg.get("num_nextn_predict_layers", 0),
            "mtp_index": MTP_INDEX if mtp_map else None}


def to_hf(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None, drop_mtp: bool = False,
          tokenizer: Optional[str] = None, max_shard_size: str = "5GB", overwrite: bool = False,
          verify: bool = False, verify_tol: float = 1e-4, verify_seq_len: Optional[int] = None,
          zero_centered_gamma: Optional[bool] = None, log=print) -> dict:
    return_freed_memory()  # streamed tensors' memory goes back to the OS when each is released
    ckpt = MegatronCheckpoint(ckpt_dir)  # validates before anything is written
    if zero_centered_gamma is not None:
        ckpt.model["layernorm_zero_centered_gamma"] = zero_centered_gamma
        ckpt.arch = dataclasses.replace(ckpt.arch, layernorm_zero_centered_gamma=zero_centered_gamma)
    size = parse_size(max_shard_size)
    torch_dtype = DTYPES[dtype] if dtype and dtype != "auto" else None
    tmp = staging_dir(out_dir, overwrite)
    try:
        summary = write_hf(ckpt, tmp, torch_dtype, drop_mtp, tokenizer, size)
        log(f"to-hf: {ckpt.path} -> {out_dir}: {summary['model_type']} config, {summary['tensors']} tensors in "
            f"{summary['shards']} shard(s), {summary['bytes'] / 2**20:.1f} MiB {summary['dtype']}, "
            f"MTP layers {summary['mtp_layers']}"
            + (f" (in {summary['mtp_index']}, which Llama loaders do not read), " if summary["mtp_index"] else ", ")
            + (f"tokenizer from {summary['tokenizer']}" if summary["tokenizer"] else
               "no tokenizer (none recorded in the --save directory; bos/eos/pad ids written as null; "
               "pass --tokenizer)"))
        if verify:
            from tri_megatron.convert.verify import check_parity

            summary["verify"] = check_parity(ckpt.path, tmp, verify_tol, seq_len=verify_seq_len, log=log)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
