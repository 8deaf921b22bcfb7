"""Architecture fields of tri_meta.json <-> Hugging Face config.json.

Export picks the most standard form the model allows:

* ``llama`` (LlamaForCausalLM, no remote code) when the model has no SSMax, iRoPE, sliding window
  or temperature tuning (MTP layers are extra weights that Llama loaders ignore);
* ``trillion`` (Trillion Labs' Tri-70B field names) for the Tri-70B layout: iRoPE every k layers,
  a sliding window on exactly the RoPE layers, no SSMax;
* ``tri`` otherwise (SSMax, or any other iRoPE/window combination).

The last two ship ``modeling_tri.py`` / ``configuration_tri.py`` and an ``auto_map``.
"""

from __future__ import annotations

from typing import Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "tri", "trillion")


class HFConfigError(ValueError):
    """The Hugging Face config describes a model tri_megatron cannot represent."""


def export_flavour(m: dict) -> str:
    k, w, skip = m.get("no_rope_freq"), m.get("window_size"), m.get("window_attn_skip_freq")
    if m.get("ssmax"):
        return "tri"
    if not k and not w and not m.get("attn_temperature_tuning"):
        return "llama"
    if k and w and skip == k:
        return "trillion"
    return "tri"


def _layer_types(m: dict, n: int, offset: int = 0) -> list:
    skip = m.get("window_attn_skip_freq")
    return ["full_attention" if skip and (offset + i + 1) % skip == 0 else "sliding_attention" for i in range(n)]


def hf_config_from_meta(m: dict, dtype: str, drop_mtp: bool = False, special_ids: Optional[dict] = None,
                        source: Optional[dict] = None) -> dict:
    """config.json contents for the export of a model described by tri_meta.json's "model"."""
    flavour = export_flavour(m)
    L, mtp = m["num_layers"], 0 if drop_mtp else (m.get("mtp_num_layers") or 0)
    cfg = {
        "vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"], "intermediate_size": m["ffn_hidden_size"],
        "num_hidden_layers": L, "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_query_groups"], "head_dim": m["kv_channels"], "hidden_act": "silu",
        "max_position_embeddings": m.get("max_position_embeddings") or m.get("seq_length"),
        "rms_norm_eps": m.get("norm_epsilon", 1e-5), "rope_theta": float(m.get("rotary_base") or 10000.0),
        "tie_word_embeddings": not m.get("untie_embeddings_and_output_weights", True),
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    cfg.update(special_ids or {})
    if mtp:
        cfg["num_nextn_predict_layers"] = mtp
    if flavour == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    else:
        k, w = m.get("no_rope_freq"), m.get("window_size")
        cfg.update(
            global_attention_freq=k or None,
            no_rope_layers=[0 if k and (i + 1) % k == 0 else 1 for i in range(L)],  # 1 = RoPE (Llama-4 polarity)
            sliding_window=w or None,
            layer_types=_layer_types(m, L) if w else None,
            attn_temperature_tuning=bool(m.get("attn_temperature_tuning")),
            floor_scale=float(m.get("attn_floor_scale") or 8192.0),
            attn_scale=float(m.get("attn_scale") if m.get("attn_scale") is not None else 0.1),
            ssmax=bool(m.get("ssmax")),
        )
        if mtp:
            cfg["mtp_layer_types"] = _layer_types(m, mtp, offset=L) if w else ["full_attention"] * mtp
        prefix = "Trillion" if flavour == "trillion" else "Tri"
        cfg.update(architectures=[f"{prefix}ForCausalLM"], model_type=flavour,
                   auto_map={"AutoConfig": f"configuration_tri.{prefix}Config",
                             "AutoModelForCausalLM": f"modeling_tri.{prefix}ForCausalLM"})
    if source:
        cfg["tri_megatron"] = source
    return cfg


def _periodic_freq(flags: list, want) -> Optional[int]:
    """k such that flags[i] == want exactly when (i+1) % k == 0; None if no layer has it; else error."""
    n = len(flags)
    if not any(f == want for f in flags):
        return None
    for k in range(1, n + 1):
        if n % k == 0 and all((f == want) == ((i + 1) % k == 0) for i, f in enumerate(flags)):
            return k
    raise HFConfigError(f"per-layer pattern {flags} is not 'every k-th layer'; megatron-core's no_rope_freq / "
                        f"window_attn_skip_freq need a period")


def meta_from_hf_config(cfg: dict) -> dict:
    """tri_meta "model" fields (and pretrain_tri.py flag values) for an HF Llama / Mistral / Tri config."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError(f"model_type {mt!r} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise HFConfigError(f"{flag}=true: tri_megatron models have no biases")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise HFConfigError(f"hidden_act {cfg.get('hidden_act')!r}: only SwiGLU (silu) is supported")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise HFConfigError(f"rope scaling {rope_type!r} is not supported by the Tri model (plain RoPE only)")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    L, h, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    m = {
        "num_layers": L, "hidden_size": h, "ffn_hidden_size": cfg["intermediate_size"],
        "num_attention_heads": heads, "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "kv_channels": cfg.get("head_dim") or h // heads, "vocab_size": cfg["vocab_size"],
        "mtp_num_layers": cfg.get("num_nextn_predict_layers") or 0, "ssmax": bool(cfg.get("ssmax")),
        "untie_embeddings_and_output_weights": not cfg.get("tie_word_embeddings", False),
        "rotary_base": float(theta), "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-5)),
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "no_rope_freq": None, "window_size": None, "window_attn_skip_freq": None,
        "attn_temperature_tuning": bool(cfg.get("attn_temperature_tuning")),
        "attn_floor_scale": float(cfg.get("floor_scale", 8192.0)), "attn_scale": float(cfg.get("attn_scale", 0.1)),
    }
    if mt in ("tri", "trillion"):
        k = cfg.get("global_attention_freq")
        flags = cfg.get("no_rope_layers") or [0 if k and (i + 1) % k == 0 else 1 for i in range(L)]
        m["no_rope_freq"] = _periodic_freq(list(flags), 0)
        w = cfg.get("sliding_window")
        if w:
            types = cfg.get("layer_types") or ["full_attention" if k and (i + 1) % k == 0 else "sliding_attention"
                                               for i in range(L)]
            if "sliding_attention" in types:
                m["window_size"] = int(w)
                m["window_attn_skip_freq"] = _periodic_freq(list(types), "full_attention")
    elif mt == "mistral" and cfg.get("sliding_window"):
        m["window_size"] = int(cfg["sliding_window"])
    if m["attn_temperature_tuning"] and not m["no_rope_freq"]:
        raise HFConfigError("attn_temperature_tuning acts on NoPE layers, but the config has none")
    if m["ssmax"] and m["attn_temperature_tuning"]:
        raise HFConfigError("ssmax and attn_temperature_tuning together are not supported")
    return m
