"""Hugging Face directory -> megatron-core distributed checkpoint (``convert_checkpoint.py --from-hf``).

Checks the HF config, every tensor's shape and the target layout here, then ``megatron_writer``
writes a weights-only torch_dist checkpoint at iteration 0 ("has_optimizer": false; with --keep-progress
at the iteration and consumed samples the export's config.json records, the schedule continuing) in this one
process, chunk by chunk: megatron-core's own sharded state dict of the model (built on the meta
device) says what is stored, each chunk is built from the HF tensors it needs (read one at a time)
when the writer asks for it — host memory does not grow with the model. megatron-core loads it at
any layout, so the target layout is what tri_meta.json records and the continue command states;
it is exactly what ``pretrain_tri.py --load`` continues from. Padded vocabulary rows are zeros. The
checkpoint is written to a staging directory and renamed into place when complete (and verified,
with --verify, which loads the whole model); a failure writes nothing.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Tuple

from tri_megatron.convert.hf_config import meta_from_hf_config
from tri_megatron.convert.hf_io import DTYPES, TOKENIZER_FILES, HFCheckpoint, return_freed_memory
from tri_megatron.convert.mapping import arch_of, expected_hf_shapes, hf_to_canonical
from tri_megatron.convert.megatron_ckpt import CheckpointError
from tri_megatron.convert.megatron_writer import write_checkpoint
from tri_megatron.convert.to_hf import publish, staging_dir

IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


def check_hf(hf: HFCheckpoint, m: dict, tied: bool) -> None:
    """Every tensor the architecture needs is present with its shape, and nothing unknown is."""
    arch = arch_of(m)
    expected = expected_hf_shapes(arch)
    if tied:
        expected.pop("lm_head.weight", None)
    problems = []
    for name, shape in expected.items():
        if name not in hf.weight_map:
            problems.append(f"tensor {name} is missing")
        elif hf.shape(name) != tuple(shape):
            problems.append(f"tensor {name} has shape {list(hf.shape(name))}, expected {list(shape)}")
    extra = [n for n in hf.weight_map if n not in expected and not n.endswith(IGNORED_HF_TENSORS)
             and not (n == "lm_head.weight" and tied)]
    if extra:
        problems.append(f"{len(extra)} tensor(s) the Tri model has no place for, e.g. {', '.join(sorted(extra)[:3])}")
    if problems:
        raise CheckpointError(f"{hf.path}: weights do not match config.json: " + "; ".join(problems[:6]))


def pretrain_flags(m: dict) -> str:
    """The pretrain_tri.py architecture flags that describe the imported model."""
    flags = [f"--num-layers {m['num_layers']}", f"--hidden-size {m['hidden_size']}",
             f"--ffn-hidden-size {m['ffn_hidden_size']}", f"--num-attention-heads {m['num_attention_heads']}",
             f"--num-query-groups {m['num_query_groups']}", f"--kv-channels {m['kv_channels']}",
             f"--vocab-size {m['vocab_size']}", f"--max-position-embeddings {m['max_position_embeddings']}",
             f"--rotary-base {m['rotary_base']:g}", f"--norm-epsilon {m['norm_epsilon']:g}",
             f"--no-rope-freq {m['no_rope_freq'] or 0}", f"--window-size {m['window_size'] or 0}",
             f"--window-attn-skip-freq {m['window_attn_skip_freq'] or 0}"]
    if m["mtp_num_layers"]:
        flags.append(f"--mtp-num-layers {m['mtp_num_layers']}")
    if m["ssmax"]:
        flags.append("--ssmax")
    if m["attn_temperature_tuning"]:
        flags.append(f"--attn-temperature-tuning --attn-floor-scale {m['attn_floor_scale']:g} "
                     f"--attn-scale {m['attn_scale']:g}")
    return " ".join(flags)


def recorded_progress(hf_dir: str, config: dict) -> Tuple[int, int]:
    """(iteration, consumed samples) an export of ours records in config.json's "tri_megatron" block."""
    src = config.get("tri_megatron") or {}
    it, consumed = src.get("iteration"), src.get("consumed_samples")
    if not isinstance(it, int) or not isinstance(consumed, int) or it < 0 or consumed < 0:
        raise CheckpointError(f"--keep-progress: {os.path.join(hf_dir, 'config.json')} records no training progress "
                              f"(no \"tri_megatron\" iteration and consumed_samples: not exported by tri_megatron, or "
                              f"by an older version); drop --keep-progress to start at iteration 0")
    return it, consumed


def from_hf(hf_dir: str, out_dir: str, target_tp: int = 1, target_pp: int = 1, target_vpp: Optional[int] = None,
            dtype: Optional[str] = None, overwrite: bool = False, verify: bool = False, verify_tol: float = 1e-4,
            verify_seq_len: Optional[int] = None, keep_progress: bool = False, log=print) -> dict:
    from tri_megatron.config.errors import ArgumentError
    from tri_megatron.convert.megatron_runtime import run_config_for

    return_freed_memory()  # streamed tensors' memory goes back to the OS when each is released
    hf = HFCheckpoint(hf_dir)
    m = meta_from_hf_config(hf.config)
    m["seq_length"] = m["max_position_embeddings"]
    m["model"] = f"hf:{hf.config.get('model_type')}"
    # pretrain_tri.py models have a separate output layer: a tied model is untied on import (the
    # output layer starts as a copy of the embedding, so the logits are unchanged).
    tied = not m["untie_embeddings_and_output_weights"]
    m["untie_embeddings_and_output_weights"] = True
    check_hf(hf, m, tied)
    iteration, consumed = recorded_progress(hf_dir, hf.config) if keep_progress else (0, 0)
    torch_dtype = DTYPES[dtype] if dtype and dtype != "auto" else hf.dtype()
    bf16 = {"bfloat16": True, "float32": False}.get(str(torch_dtype).replace("torch.", ""))
    if bf16 is None:
        raise CheckpointError(f"dtype {torch_dtype}: the megatron checkpoint is written in fp32 or bf16; pass --dtype")
    try:
        cfg = run_config_for(m, target_tp, target_pp, target_vpp, bf16=bf16)
    except (ArgumentError, ValueError) as e:
        raise CheckpointError(f"target layout TP={target_tp} PP={target_pp} VPP={target_vpp or 1}: {e}") from None
    tmp = staging_dir(out_dir, overwrite)
    try:
        arch = arch_of(m)

        def get(name):  # a tied source has no lm_head: the output layer starts as the embedding
            return hf.get("model.embed_tokens.weight" if name == "lm_head.weight" and tied else name)

        write_checkpoint(tmp, cfg, lambda name: hf_to_canonical(name, get, arch), iteration, consumed)
        for fname in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(hf_dir, fname)):
                shutil.copyfile(os.path.join(hf_dir, fname), os.path.join(tmp, fname))
        log(f"from-hf: {hf_dir} -> {out_dir}: {hf.config.get('model_type')} -> megatron checkpoint at TP={target_tp} "
            f"PP={target_pp} VPP={target_vpp or 1}, {'bf16' if bf16 else 'fp32'}, iteration {iteration}"
            + (f" and {consumed} consumed samples kept (data order and learning-rate schedule continue)"
               if keep_progress else "") + ", weights only"
            + (", tied embeddings untied (output layer = copy of the embedding)" if tied else ""))
        log(f"continue training with: pretrain_tri.py {pretrain_flags(m)}{' --bf16' if bf16 else ''} "
            f"--tensor-model-parallel-size {target_tp} --pipeline-model-parallel-size {target_pp} --load {out_dir} ...")
        summary = {"meta": m, "bf16": bf16, "pretrain_flags": pretrain_flags(m), "iteration": iteration,
                   "consumed_samples": consumed}
        if verify:
            from tri_megatron.convert.verify import check_parity

            summary["verify"] = check_parity(tmp, hf_dir, verify_tol, seq_len=verify_seq_len, log=log)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
