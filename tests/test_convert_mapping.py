"""Conversion mapping against hand-built megatron layouts: GQA QKV interleaving, SwiGLU fc1 under TP,
layer-norm-1p, Transformer Engine / local / MTP naming, vocabulary padding, config fields both ways."""

import pytest
import torch

from tri_megatron.convert import mapping as mp
from tri_megatron.convert.hf_config import HFConfigError, export_flavour, hf_config_from_meta, meta_from_hf_config

NH, NG, D, H = 8, 2, 4, 16  # 4 query heads per group


def _megatron_qkv_rank(q, k, v, tp_rank, tp):
    """The QKV weight TP rank `tp_rank` holds, built the way megatron lays it out: its groups,
    each [q heads of the group; k; v]."""
    hpg, blocks = NH // NG, []
    for g in range(NG // tp * tp_rank, NG // tp * (tp_rank + 1)):
        blocks += [q[g * hpg * D:(g + 1) * hpg * D], k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]]
    return torch.cat(blocks)


def test_qkv_interleaving_matches_megatron_layout_at_every_tp():
    q, k, v = torch.randn(NH * D, H), torch.randn(NG * D, H), torch.randn(NG * D, H)
    merged = mp.merge_qkv(q, k, v, NH, NG, D)
    for tp in (1, 2):
        ranks = [_megatron_qkv_rank(q, k, v, r, tp) for r in range(tp)]
        # dist_checkpointing stores the rank shards concatenated: the TP-merged layout is the TP=1 one
        assert torch.equal(torch.cat(ranks), merged)
        assert all(torch.equal(a, b) for a, b in zip(merged.chunk(tp), ranks))
    q2, k2, v2 = mp.split_qkv(merged, NH, NG, D)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_swiglu_fc1_per_rank_shards_are_split_before_merging():
    gate, up = torch.randn(12, H), torch.randn(12, H)
    full = torch.cat([gate, up])
    for tp in (1, 2, 3):
        shards = [torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]) for r in range(tp)]  # what rank r holds
        assert all(torch.equal(mp.fc1_tp_shard(full, r, tp), shards[r]) for r in range(tp))
        assert torch.equal(mp.fc1_merge_tp_shards(shards), full)
        if tp > 1:  # naive concatenation of the rank shards would interleave gate and up
            assert not torch.equal(torch.cat(shards), full)
    g2, u2 = mp.split_fc1(full)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def _dims(**kw):
    m = dict(num_layers=2, hidden_size=H, ffn_hidden_size=12, num_attention_heads=NH, num_query_groups=NG,
             kv_channels=D, vocab_size=200, mtp_num_layers=1, untie_embeddings_and_output_weights=True)
    m.update(kw)
    return mp.arch_of(m)


def test_layernorm_1p_adds_one_on_export_and_removes_it_on_import():
    dims = _dims(layernorm_zero_centered_gamma=True)
    gamma = torch.randn(H) * 0.01
    names = ["decoder.layers.1.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
             "decoder.final_layernorm.weight", "mtp.layers.0.enorm.weight", "mtp.layers.0.final_layernorm.weight",
             "mtp.layers.0.transformer_layer.input_layernorm.weight"]
    for name in names:
        [(hf_name, t)] = mp.canonical_to_hf(name, gamma, dims)
        assert torch.allclose(t, gamma + 1)
        back = mp.hf_to_canonical(name, {hf_name: t}.__getitem__, dims)
        assert torch.allclose(back, gamma, atol=1e-6)  # (g + 1) - 1 rounds in fp32
    [(_, w)] = mp.canonical_to_hf("decoder.layers.0.self_attention.linear_proj.weight", gamma[None], dims)
    assert torch.equal(w, gamma[None])  # only norms shift


def test_names_te_local_mtp_and_vocab_padding():
    dims = _dims()
    t = torch.randn(H)
    # Transformer Engine's fused norms and the local spec's land on the same HF name
    assert mp.canonical_to_hf("decoder.layers.1." + mp.canonical_layer_suffix(
        "self_attention.linear_qkv.layer_norm_weight"), t, dims)[0][0] == "model.layers.1.input_layernorm.weight"
    assert mp.canonical_layer_suffix("mlp.linear_fc1.layer_norm_weight") == "pre_mlp_layernorm.weight"
    # MTP module j -> DeepSeek-V3 style extra layer L + j, both megatron-core inner-block names
    for inner in mp.MTP_INNER_NAMES:
        [(n, _)] = mp.canonical_to_hf(f"mtp.layers.0.{inner}.mlp.linear_fc2.weight", torch.randn(H, 12), dims)
        assert n == "model.layers.2.mlp.down_proj.weight"
    assert mp.canonical_to_hf("mtp.layers.0.final_layernorm.weight", t, dims)[0][0] == \
        "model.layers.2.shared_head.norm.weight"
    assert mp.canonical_to_hf("mtp.layers.0.eh_proj.weight", torch.randn(H, 2 * H), dims, drop_mtp=True) == []
    # vocabulary: 200 real rows, padded to 256; padding dropped on export, zeros on import
    emb = torch.randn(256, H)
    [(n, e)] = mp.canonical_to_hf("embedding.word_embeddings.weight", emb, dims)
    assert n == "model.embed_tokens.weight" and torch.equal(e, emb[:200])
    back = mp.hf_to_canonical("embedding.word_embeddings.weight", {n: e}.__getitem__, dims)
    assert back.shape == (256, H) and torch.equal(back[:200], emb[:200]) and not back[200:].any()
    # tied embeddings: no lm_head on export, the output layer comes from the embedding on import
    tied = _dims(untie_embeddings_and_output_weights=False)
    assert mp.canonical_to_hf("output_layer.weight", emb, tied) == []
    assert torch.equal(mp.hf_to_canonical("output_layer.weight", {n: e}.__getitem__, tied)[:200], e)


def _meta(**kw):
    m = dict(num_layers=4, hidden_size=H, ffn_hidden_size=12, num_attention_heads=NH, num_query_groups=NG,
             kv_channels=D, vocab_size=200, mtp_num_layers=0, ssmax=False, untie_embeddings_and_output_weights=True,
             rotary_base=10000.0, norm_epsilon=1e-5, max_position_embeddings=64, no_rope_freq=None,
             window_size=None, window_attn_skip_freq=None, attn_temperature_tuning=False, attn_floor_scale=8192.0,
             attn_scale=0.1)
    m.update(kw)
    return m


@pytest.mark.parametrize("kw,flavour", [
    ({}, "llama"),
    ({"mtp_num_layers": 2}, "llama"),
    ({"ssmax": True, "no_rope_freq": 2}, "tri"),
    ({"window_size": 8}, "tri"),
    ({"no_rope_freq": 4, "window_size": 8, "window_attn_skip_freq": 4, "attn_temperature_tuning": True,
      "attn_floor_scale": 4.0, "attn_scale": 0.5}, "trillion"),
    ({"no_rope_freq": 2, "window_size": 8, "window_attn_skip_freq": 4}, "tri"),
])
def test_config_round_trip(kw, flavour):
    m = _meta(**kw)
    cfg = hf_config_from_meta(m, "float32")
    assert export_flavour(m) == flavour and cfg["model_type"] == flavour
    assert ("auto_map" in cfg) == (flavour != "llama")
    back = meta_from_hf_config(cfg)
    assert {k: back[k] for k in back if k in m} == {k: m[k] for k in back if k in m}
    if m["no_rope_freq"]:  # Llama-4 polarity in HF: 1 = uses RoPE
        k = m["no_rope_freq"]
        assert cfg["no_rope_layers"] == [0 if (i + 1) % k == 0 else 1 for i in range(4)]
    if flavour == "trillion":  # Trillion Labs' field names
        assert (cfg["global_attention_freq"], cfg["sliding_window"], cfg["attn_temperature_tuning"],
                cfg["floor_scale"], cfg["attn_scale"]) == (4, 8, True, 4.0, 0.5)


def test_unsupported_hf_configs_are_rejected():
    base = hf_config_from_meta(_meta(), "float32")
    with pytest.raises(HFConfigError, match="rope scaling"):
        meta_from_hf_config(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(HFConfigError, match="attention_bias"):
        meta_from_hf_config(dict(base, attention_bias=True))
    with pytest.raises(HFConfigError, match="model_type"):
        meta_from_hf_config(dict(base, model_type="gpt2"))
    tri = hf_config_from_meta(_meta(ssmax=True), "float32")
    with pytest.raises(HFConfigError, match="every k-th"):
        meta_from_hf_config(dict(tri, no_rope_layers=[1, 0, 0, 1]))


def test_remote_code_config_derives_layer_pattern():
    import importlib.util
    import os

    import tri_megatron.convert as conv

    path = os.path.join(os.path.dirname(conv.__file__), "hf_modeling", "configuration_tri.py")
    spec = importlib.util.spec_from_file_location("configuration_tri_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.TrillionConfig(num_hidden_layers=8, global_attention_freq=4, sliding_window=16)
    assert cfg.model_type == "trillion"
    assert cfg.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]


def test_megatron_lm_args_describe_checkpoints_without_tri_meta():
    import argparse

    from tri_megatron.convert.megatron_ckpt import meta_from_megatron_args

    args = argparse.Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                              group_query_attention=True, num_query_groups=2, kv_channels=None, vocab_size=None,
                              padded_vocab_size=512, untie_embeddings_and_output_weights=True, rotary_base=500000,
                              norm_epsilon=1e-6, max_position_embeddings=128, seq_length=128, normalization="RMSNorm",
                              swiglu=True, apply_layernorm_1p=True, mtp_num_layers=None)
    m = meta_from_megatron_args(args)
    assert (m["num_query_groups"], m["kv_channels"], m["vocab_size"], m["rotary_base"]) == (2, 16, 512, 500000.0)
    assert m["layernorm_zero_centered_gamma"] and mp.arch_of(m).layernorm_zero_centered_gamma
