"""megatron-core <-> Hugging Face conversion end to end (CPU): logits parity, greedy generation, bit-exact
round trips, imports that pretrain_tri.py continues from, and clear errors that write nothing.

Two TP=2 x PP=2 checkpoints are trained for two iterations (high learning rate, so SSMax scales and
weights are no longer at their initial values): one with MTP, SSMax, iRoPE and sliding windows and a
padded vocabulary (1000 -> 1024), one plain (exported as a standard Llama). A Tri-70B-layout model
(iRoPE + windows + temperature tuning, Trillion field names) is built on the Hugging Face side and
imported.
"""

import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="tri_hf_modules_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from launcher import TINY, run, train  # noqa: E402

TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
FEATURES = ["--vocab-size", "1000", "--mtp-num-layers", "1", "--ssmax", "--no-rope-freq", "2",
            "--window-size", "8", "--window-attn-skip-freq", "2"]
TOL = 1e-4


def _trained(root, extra):
    run(4, TINY + TP2PP2 + extra + ["--lr", "2e-2", "--train-iters", "2", "--save", root, "--save-interval", "2"])
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("convert")
    return {"features": _trained(str(base / "features"), FEATURES), "plain": _trained(str(base / "plain"), [])}


def _hf_files(d):
    return sorted(os.listdir(d))


def _hf_says(what):
    """Failure text for a check that depends on transformers' behaviour (the version it was verified with)."""
    import transformers

    return (f"{what} with transformers {transformers.__version__} (verified with transformers 4.57.6 and 5.24.0; "
            f"a transformers release may have changed its cache or loading API)")


def _greedy_both(ckpt, hf_dir, vocab):
    from tri_megatron.convert.megatron_ckpt import read_checkpoint_meta, resolve_checkpoint
    from tri_megatron.convert.megatron_runtime import load_tp1_model, megatron_greedy
    from tri_megatron.convert.verify import load_hf_model

    path = resolve_checkpoint(ckpt)
    meg = load_tp1_model(path, read_checkpoint_meta(path)["model"])
    hf = load_hf_model(hf_dir)
    prompt = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(3))
    ours = megatron_greedy(meg, prompt, 20, vocab)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    return ours, theirs


def test_tri_features_export_parity_generate_and_bitexact_roundtrip(ckpts, tmp_path, megatron_single_process):
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint, read_checkpoint_meta
    from tri_megatron.convert.to_hf import to_hf
    from tri_megatron.convert.verify import check_parity

    hf = str(tmp_path / "hf")
    summary = to_hf(ckpts["features"], hf)
    assert summary["model_type"] == "tri" and summary["mtp_layers"] == 1
    files = _hf_files(hf)
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "modeling_tri.py",
            "configuration_tri.py"} <= set(files) and any(f.startswith("model-00001-of-") for f in files)
    assert "tokenizer.json" not in files  # mock-data run: no tokenizer, none written
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["no_rope_layers"] == [1, 0, 1, 0] and cfg["sliding_window"] == 8 and cfg["ssmax"]
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["vocab_size"] == 1000
    wmap = json.load(open(os.path.join(hf, "model.safetensors.index.json")))["weight_map"]
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.q_proj", "mlp.gate_proj"):
        assert f"model.layers.4.{name}.weight" in wmap  # MTP module 0 stored DeepSeek-V3 style as layer L+0
    assert "model.layers.0.self_attn.ssmax_scale" in wmap

    # logits parity, main head and MTP head (the SSMax scales are trained apart, not all equal)
    assert MegatronCheckpoint(ckpts["features"]).canonical_state_dict()[
        "decoder.layers.0.self_attention.core_attention.query_scaling.ssmax_scale"].std() > 1e-3
    result = check_parity(ckpts["features"], hf, TOL, seq_len=64)
    assert result["max_abs_diff"] <= TOL and max(result["mtp_max_abs_diff"]) <= TOL
    assert result["logit_scale"] > 1.0  # logits are not trivially small

    # transformers' generate (KV cache, sliding-window cache layers) == the project's own greedy forward
    ours, theirs = _greedy_both(ckpts["features"], hf, 1000)
    assert torch.equal(ours, theirs), _hf_says(f"cached generate differs from our greedy forward: {ours} {theirs}")

    # --drop-mtp: the same model without the MTP module
    nomtp = str(tmp_path / "nomtp")
    to_hf(ckpts["features"], nomtp, drop_mtp=True)
    wmap = json.load(open(os.path.join(nomtp, "model.safetensors.index.json")))["weight_map"]
    assert not any(n.startswith("model.layers.4.") for n in wmap)
    assert "num_nextn_predict_layers" not in json.load(open(os.path.join(nomtp, "config.json")))
    assert check_parity(ckpts["features"], nomtp, TOL, seq_len=64)["max_abs_diff"] <= TOL
    # a bf16 export of the fp32 checkpoint (parity measured on the same bf16-rounded weights)
    bf16 = str(tmp_path / "bf16")
    assert to_hf(ckpts["features"], bf16, dtype="bf16")["dtype"] == "bfloat16"
    result = check_parity(ckpts["features"], bf16, TOL, seq_len=64)
    assert result["max_abs_diff"] <= TOL and max(result["mtp_max_abs_diff"]) <= TOL

    # HF -> megatron at another layout: the stored tensors are bit-identical (padded rows zeroed)
    back = str(tmp_path / "back")
    from_hf(hf, back, target_tp=2, target_pp=1)
    meta = read_checkpoint_meta(os.path.join(back, "iter_0000000"))
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 1 and meta["has_optimizer"] is False
    src = MegatronCheckpoint(ckpts["features"]).canonical_state_dict()
    dst = MegatronCheckpoint(back).canonical_state_dict()
    assert src.keys() == dst.keys()
    for name, t in src.items():
        if t.shape[0] == 1024:  # padded vocabulary rows are dropped by the HF export
            assert torch.equal(dst[name][:1000], t[:1000]) and not dst[name][1000:].any(), name
        else:
            assert torch.equal(dst[name], t), name


def test_plain_export_is_standard_llama_with_parity_and_generate(ckpts, tmp_path, megatron_single_process):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tri_megatron.convert.to_hf import to_hf
    from tri_megatron.convert.verify import check_parity

    hf = str(tmp_path / "llama")
    to_hf(ckpts["plain"], hf, max_shard_size="1MB")
    files = _hf_files(hf)
    assert "modeling_tri.py" not in files and sum(f.endswith(".safetensors") for f in files) > 1
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    model = AutoModelForCausalLM.from_pretrained(hf)  # no trust_remote_code
    assert isinstance(model, LlamaForCausalLM), _hf_says(f"the export loaded as {type(model).__name__}")
    result = check_parity(ckpts["plain"], hf, TOL, seq_len=64)
    assert result["max_abs_diff"] <= TOL and result["logit_scale"] > 1.0
    ours, theirs = _greedy_both(ckpts["plain"], hf, 1024)
    assert torch.equal(ours, theirs), _hf_says(f"Llama generate differs from our greedy forward: {ours} {theirs}")


def _trillion_source(d):
    """A random Tri-70B-layout model saved by transformers itself (Trillion field names, remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tri_megatron.convert.hf_config import hf_config_from_meta
    from tri_megatron.convert.to_hf import HF_MODELING_DIR, REMOTE_CODE_FILES

    os.makedirs(d)
    m = dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
             kv_channels=32, vocab_size=1000, mtp_num_layers=0, ssmax=False, untie_embeddings_and_output_weights=True,
             rotary_base=10000.0, norm_epsilon=1e-5, max_position_embeddings=256, no_rope_freq=2, window_size=8,
             window_attn_skip_freq=2, attn_temperature_tuning=True, attn_floor_scale=4.0, attn_scale=0.5)
    json.dump(hf_config_from_meta(m, "float32"), open(os.path.join(d, "config.json"), "w"))
    for f in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(HF_MODELING_DIR, f), os.path.join(d, f))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d, trust_remote_code=True),
                                             trust_remote_code=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "embed" in name else 0.06
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(d)
    return model


def test_trillion_import_parity_roundtrip_and_training_continues(tmp_path, megatron_single_process):
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.hf_io import HFCheckpoint
    from tri_megatron.convert.to_hf import to_hf

    src = str(tmp_path / "trillion")
    _trillion_source(src)
    ck = str(tmp_path / "ck")
    summary = from_hf(src, ck, target_tp=1, target_pp=2, target_vpp=2, verify=True, verify_seq_len=64)
    assert summary["verify"]["max_abs_diff"] <= TOL  # megatron loaded the PP=2 x VPP=2 checkpoint at TP=PP=1
    assert json.load(open(os.path.join(ck, "iter_0000000", "tri_meta.json")))["layout"]["vpp"] == 2

    back = str(tmp_path / "trillion_back")
    to_hf(ck, back)
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert cfg["model_type"] == "trillion" and cfg["architectures"] == ["TrillionForCausalLM"]
    assert (cfg["global_attention_freq"], cfg["sliding_window"], cfg["attn_temperature_tuning"],
            cfg["floor_scale"], cfg["attn_scale"]) == (2, 8, True, 4.0, 0.5)
    a, b = HFCheckpoint(src), HFCheckpoint(back)
    assert set(a.weight_map) == set(b.weight_map)
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.weight_map)

    # pretrain_tri.py continues from the imported weights (here on one process: resharded on load)
    flags = summary["pretrain_flags"].split()
    records = train(1, TINY + flags + ["--load", ck, "--train-iters", "1"], str(tmp_path / "log.jsonl"))
    assert [r["iteration"] for r in records] == [1] and records[0]["lm_loss"] == records[0]["lm_loss"]


def test_bad_checkpoints_give_clear_errors_and_write_nothing(ckpts, tmp_path, megatron_single_process):
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import CheckpointError
    from tri_megatron.convert.to_hf import to_hf
    from tri_megatron.convert.verify import ParityError, check_parity

    src = os.path.join(ckpts["plain"], "iter_0000002")
    out = str(tmp_path / "out")
    # wrong shape: the metadata says one thing, the tensors another
    wrong = str(tmp_path / "wrong")
    shutil.copytree(src, wrong)
    meta = json.load(open(os.path.join(wrong, "tri_meta.json")))
    meta["model"]["ffn_hidden_size"] = 512
    json.dump(meta, open(os.path.join(wrong, "tri_meta.json"), "w"))
    with pytest.raises(CheckpointError, match=r"linear_fc1.weight has shape \[4, 768, 128\], expected \[4, 1024, 128\]"):
        to_hf(wrong, out)
    assert not os.path.exists(out) and not os.path.exists(out + "_staging")
    # a missing shard file, through the command line: exit 2, one line, nothing written
    missing = str(tmp_path / "missing")
    shutil.copytree(src, missing)
    os.remove(os.path.join(missing, "__1_0.distcp"))
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_checkpoint.py")
    proc = subprocess.run([sys.executable, tool, "--to-hf", missing, out], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing shard file(s) __1_0.distcp" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(out)

    # an HF tensor of the wrong shape, and a layout that does not fit the model: nothing written
    hf = str(tmp_path / "hf")
    to_hf(src, hf)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    bad = str(tmp_path / "hf_bad")
    shutil.copytree(hf, bad)
    json.dump(dict(cfg, intermediate_size=512), open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape \[384, 128\], expected \[512, 128\]"):
        from_hf(bad, out)
    with pytest.raises(CheckpointError, match="--num-layers 4 is not divisible"):
        from_hf(hf, out, target_pp=3)
    assert not os.path.exists(out) and not os.path.exists(out + "_staging")
    with pytest.raises(FileExistsError, match="--overwrite"):
        to_hf(src, hf)

    # the verifier notices a wrong conversion (k and v swapped in one layer)
    from safetensors.torch import load_file, save_file

    shard = os.path.join(hf, json.load(open(os.path.join(hf, "model.safetensors.index.json")))["weight_map"][
        "model.layers.1.self_attn.k_proj.weight"])
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.layers.1.self_attn.v_proj.weight"] = (
        tensors["model.layers.1.self_attn.v_proj.weight"], tensors["model.layers.1.self_attn.k_proj.weight"])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ParityError):
        check_parity(src, hf, TOL, seq_len=32)


def test_tied_bf16_llama_import(tmp_path, megatron_single_process):
    """A bf16 Llama with tied embeddings (as transformers saves it) imports untied, in bf16, logits equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint
    from tri_megatron.convert.to_hf import to_hf

    src = str(tmp_path / "llama_tied")
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else (0.5 if "embed" in name else 0.06) * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(src)
    ck = str(tmp_path / "ck")
    summary = from_hf(src, ck, verify=True, verify_seq_len=32)
    assert summary["bf16"] and summary["meta"]["untie_embeddings_and_output_weights"]
    assert summary["verify"]["max_abs_diff"] <= TOL
    state = MegatronCheckpoint(ck)
    assert state.dtype == torch.bfloat16
    sd = state.canonical_state_dict()
    assert torch.equal(sd["output_layer.weight"], sd["embedding.word_embeddings.weight"])
    back = str(tmp_path / "back_fp32")
    to_hf(ck, back, dtype="fp32")
    out = json.load(open(os.path.join(back, "config.json")))
    assert out["dtype"] == "float32" and out["tie_word_embeddings"] is False and out["model_type"] == "llama"
