"""Logits parity between a megatron-core checkpoint and a Hugging Face directory (``--verify``).

Runs the project's own model (TP=PP=1, fp32, loaded by megatron-core's dist_checkpointing from any
layout) and the Hugging Face model (AutoModelForCausalLM, trust_remote_code for Tri configs, fp32)
on the same random tokens on CPU, and reports max |Δlogit| over the real vocabulary, for the main
head and, when the HF model exposes ``mtp_logits``, for every MTP depth. Raises ``ParityError``
above the bound.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch


class ParityError(RuntimeError):
    """The converted model's logits differ from the source beyond the bound."""


def load_hf_model(hf_dir: str):
    import transformers
    from transformers import AutoModelForCausalLM

    with open(os.path.join(hf_dir, "config.json")) as f:
        remote = "auto_map" in json.load(f)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # load-time notices (remote code, generation defaults)
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=remote)
    finally:
        transformers.logging.set_verbosity(level)
    return model.eval()


def tri_model_from_dir(hf_dir: str):
    """The directory's weights in our own Tri modeling code (also for a Llama export: its MTP layers)."""
    from safetensors.torch import load_file

    from tri_megatron.convert.hf_io import HFCheckpoint
    from tri_megatron.convert.hf_modeling.configuration_tri import TriConfig
    from tri_megatron.convert.hf_modeling.modeling_tri import TriForCausalLM

    ck = HFCheckpoint(hf_dir)
    cfg = {k: v for k, v in ck.config.items() if k not in ("model_type", "architectures", "auto_map", "dtype")}
    model = TriForCausalLM(TriConfig(**cfg))
    state = {}
    for fname in sorted(set(ck.weight_map.values())):
        state.update(load_file(os.path.join(hf_dir, fname)))
    model.load_state_dict(state, strict=not cfg.get("tie_word_embeddings"))
    if cfg.get("tie_word_embeddings"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.float().eval()


def check_parity(megatron_ckpt: str, hf_dir: str, tol: float = 1e-4, seq_len: Optional[int] = None,
                 batch: int = 2, seed: int = 0, log=print) -> dict:
    from tri_megatron.convert.hf_io import HFCheckpoint
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint, read_checkpoint_meta, resolve_checkpoint
    from tri_megatron.convert.megatron_runtime import load_tp1_model, megatron_logits

    path = resolve_checkpoint(megatron_ckpt)
    m = read_checkpoint_meta(path)["model"]
    meg = load_tp1_model(path, m)
    hf = load_hf_model(hf_dir)
    # Both run in fp32; when either side's weights are bf16, round the other side's the same way so
    # that only the conversion, not the dtype cast, is measured.
    low = {MegatronCheckpoint(path).dtype, HFCheckpoint(hf_dir).dtype()} - {torch.float32}
    round_to = low.pop() if low else None
    if round_to is not None:
        with torch.no_grad():
            for p in list(meg.parameters()) + list(hf.parameters()):
                p.copy_(p.to(round_to).float())
    vocab = m["vocab_size"]
    s = seq_len or min(128, m.get("max_position_embeddings") or 128)
    tokens = torch.randint(0, vocab, (batch, s), generator=torch.Generator().manual_seed(seed))
    meg_main, meg_mtp = megatron_logits(meg, tokens)
    with torch.no_grad():
        hf_main = hf(input_ids=tokens, use_cache=False).logits.float()
    result = {"max_abs_diff": (hf_main - meg_main[..., :vocab]).abs().max().item(),
              "logit_scale": meg_main[..., :vocab].abs().max().item(), "tokens": list(tokens.shape)}
    if meg_mtp and getattr(hf.config, "num_nextn_predict_layers", 0):
        # standard loaders (Llama) skip the MTP layers: run them through our modeling code
        mtp_model = hf if hasattr(hf, "mtp_logits") else tri_model_from_dir(hf_dir)
        if round_to is not None:
            with torch.no_grad():
                for p in mtp_model.parameters():
                    p.copy_(p.to(round_to).float())
        hf_mtp = mtp_model.mtp_logits(tokens)
        result["mtp_max_abs_diff"] = [(h.float() - g[..., :vocab]).abs().max().item() for h, g in zip(hf_mtp, meg_mtp)]
    worst = max([result["max_abs_diff"]] + result.get("mtp_max_abs_diff", []))
    log(f"verify: max |Δlogit| = {result['max_abs_diff']:.3e} (logits up to {result['logit_scale']:.2f}) "
        + (f"MTP heads {', '.join(f'{d:.3e}' for d in result['mtp_max_abs_diff'])} " if "mtp_max_abs_diff" in result else "")
        + f"on {batch}x{s} tokens; bound {tol:g}: {'OK' if worst <= tol else 'FAILED'}")
    if not worst <= tol:
        raise ParityError(f"max |Δlogit| {worst:.3e} exceeds {tol:g}")
    return result
