"""Hugging Face exports ready to serve: the trainer records its tokenizer in --save and --to-hf ships it (special
token ids in config.json and generation_config.json, model_max_length = the context length); a Llama export with
MTP loads in transformers with no unexpected or missing key and holds, in the files a strict loader (vLLM's rule:
the safetensors files model.safetensors.index.json names) reads, exactly the LlamaForCausalLM weights, while the
MTP modules round-trip through --from-hf; --from-hf --keep-progress continues the iteration, data position and
learning-rate warm-up.

One tri-tiny run on one process (MTP, a tokenizer trained here, a warm-up longer than the run, three iterations,
saved at 2 and 3).
"""

import glob
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="tri_hf_modules_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from launcher import TINY, train  # noqa: E402
from test_data_common import small_tokenizer  # noqa: E402

TOL = 1e-4
WARMUP = ["--lr-warmup-iters", "10", "--lr-decay-iters", "20", "--mtp-num-layers", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    tok = small_tokenizer(base)
    save = str(base / "ckpt")
    records = train(1, TINY + WARMUP + ["--tokenizer", tok, "--train-iters", "3", "--save", save, "--save-interval",
                                        "2"], str(base / "log.jsonl"))
    assert [r["iteration"] for r in records] == [1, 2, 3]
    return {"save": save, "tokenizer": tok, "base": base, "records": records}


def _special_ids(tok_dir):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).get_vocab(with_added_tokens=True)
    return vocab["<|endoftext|>"], vocab["<|pad|>"]  # tools/train_tokenizer.py's EOD (bos = eos) and PAD


def test_trainer_records_tokenizer_and_export_ships_it_with_special_ids(trained, tmp_path):
    from transformers import AutoTokenizer

    from tri_megatron.convert.to_hf import to_hf

    save, tok = trained["save"], trained["tokenizer"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert open(os.path.join(save, name), "rb").read() == open(os.path.join(tok, name), "rb").read(), name
    hf = str(tmp_path / "hf")
    assert to_hf(save, hf)["tokenizer"] == os.path.join(save, "tokenizer.json")  # no --tokenizer given
    eos, pad = _special_ids(tok)
    assert (eos, pad) != (2, 1)  # not what transformers' Llama defaults would say
    want = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    for fname in ("config.json", "generation_config.json"):
        cfg = json.load(open(os.path.join(hf, fname)))
        assert {k: cfg.get(k) for k in want} == want, fname
    context = json.load(open(os.path.join(save, "iter_0000003", "tri_meta.json")))["model"]["max_position_embeddings"]
    assert json.load(open(os.path.join(hf, "tokenizer_config.json")))["model_max_length"] == context == 256
    hf_tok = AutoTokenizer.from_pretrained(hf)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.model_max_length) == ("<|endoftext|>", "<|pad|>", 256)

    # a checkpoint with no tokenizer anywhere: the ids are stated as null, never left to transformers' defaults
    bare = str(tmp_path / "bare")
    shutil.copytree(os.path.join(save, "iter_0000003"), os.path.join(bare, "iter_0000003"))
    out = str(tmp_path / "hf_bare")
    assert to_hf(bare, out)["tokenizer"] is None and not os.path.exists(os.path.join(out, "tokenizer.json"))
    for fname in ("config.json", "generation_config.json"):
        cfg = json.load(open(os.path.join(out, fname)))
        assert {k: cfg.get(k, "absent") for k in want} == dict.fromkeys(want), fname


def _vllm_weight_files(hf_dir):
    """The safetensors files vLLM's default loader reads: every *.safetensors filtered by the files
    model.safetensors.index.json names (its filter_duplicate_safetensors_files)."""
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"]
    named = {os.path.join(hf_dir, f) for f in index.values()}
    return [f for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))) if f in named]


def _tensor(hf_dir, index, name):
    from safetensors import safe_open

    fname = json.load(open(os.path.join(hf_dir, f"{index}.safetensors.index.json")))["weight_map"][name]
    with safe_open(os.path.join(hf_dir, fname), "pt") as st:
        return st.get_tensor(name)


def test_llama_export_loads_strictly_and_mtp_round_trips(trained, tmp_path, megatron_single_process):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint
    from tri_megatron.convert.to_hf import to_hf
    from tri_megatron.convert.verify import check_parity

    src = os.path.join(trained["save"], "iter_0000003")
    hf = str(tmp_path / "hf")
    summary = to_hf(src, hf)
    assert summary["model_type"] == "llama" and summary["mtp_layers"] == 1
    model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert isinstance(model, LlamaForCausalLM)
    assert {k: list(v) for k, v in info.items() if v} == {}  # no unexpected, missing or mismatched key
    stored = set()
    for f in _vllm_weight_files(hf):
        with safe_open(f, "pt") as st:
            stored |= set(st.keys())
    assert stored == set(model.state_dict())  # a strict loader finds a parameter for every tensor, and all of them
    mtp = json.load(open(os.path.join(hf, "mtp.safetensors.index.json")))["weight_map"]
    assert mtp and all(n.startswith("model.layers.4.") for n in mtp)  # MTP depth 0 = layer L (DeepSeek-V3 names)
    assert not set(mtp) & stored

    # --layernorm-1p: the source's gammas are zero-centred, the export adds one (MTP norms too)
    gamma = str(tmp_path / "gamma")
    to_hf(src, gamma, zero_centered_gamma=True)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.4.enorm.weight"):
        index = "mtp" if name.startswith("model.layers.4.") else "model"
        plain, shifted = (_tensor(d, index, name) for d in (hf, gamma))
        assert torch.equal(shifted, plain + 1), name

    # the MTP heads are still exported exactly (read through both indexes) and come back on import
    result = check_parity(src, hf, TOL, seq_len=32)
    assert result["max_abs_diff"] <= TOL and len(result["mtp_max_abs_diff"]) == 1
    assert result["mtp_max_abs_diff"][0] <= TOL
    back = str(tmp_path / "back")
    from_hf(hf, back, target_tp=1, target_pp=1)
    a, b = MegatronCheckpoint(src).canonical_state_dict(), MegatronCheckpoint(back).canonical_state_dict()
    assert a.keys() == b.keys() and any(k.startswith("mtp.") for k in a)
    for k, t in a.items():  # the export drops the padded vocabulary rows; the import restores them as zeros
        rows = 600 if k in ("embedding.word_embeddings.weight", "output_layer.weight") else t.shape[0]
        assert torch.equal(b[k][:rows], t[:rows]) and not b[k][rows:].any(), k


def test_keep_progress_continues_iteration_data_and_warmup(trained, tmp_path, megatron_single_process):
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import CheckpointError
    from tri_megatron.convert.to_hf import to_hf

    hf = str(tmp_path / "hf")
    to_hf(os.path.join(trained["save"], "iter_0000002"), hf)
    recorded = json.load(open(os.path.join(hf, "config.json")))["tri_megatron"]
    assert (recorded["iteration"], recorded["consumed_samples"], recorded["consumed_tokens"]) == (2, 16, 16 * 64)
    ck = str(tmp_path / "ck")
    summary = from_hf(hf, ck, keep_progress=True)
    assert (summary["iteration"], summary["consumed_samples"]) == (2, 16)
    meta = json.load(open(os.path.join(ck, "iter_0000002", "tri_meta.json")))
    assert (meta["iteration"], meta["consumed_samples"], meta["has_optimizer"]) == (2, 16, False)
    records = train(1, TINY + WARMUP + ["--tokenizer", trained["tokenizer"], "--load", ck, "--train-iters", "3"],
                    str(tmp_path / "log.jsonl"))
    original = trained["records"][2]  # the run that made the export, at its iteration 3
    assert [r["iteration"] for r in records] == [3]
    assert records[0]["consumed_samples"] == original["consumed_samples"] == 24
    assert records[0]["lr"] == pytest.approx(original["lr"], rel=1e-6)  # warm-up continues, not restarted
    assert original["lr"] != pytest.approx(trained["records"][0]["lr"], rel=1e-3)

    # an HF model that is not our export records no progress: one line, nothing written
    foreign = str(tmp_path / "foreign")
    shutil.copytree(hf, foreign)
    cfg = json.load(open(os.path.join(foreign, "config.json")))
    del cfg["tri_megatron"]
    json.dump(cfg, open(os.path.join(foreign, "config.json"), "w"))
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="--keep-progress: .* records no training progress"):
        from_hf(foreign, out, keep_progress=True)
    assert not os.path.exists(out)
