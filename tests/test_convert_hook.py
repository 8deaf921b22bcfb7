"""Intermediate Hugging Face exports: the on_save hook starts a background conversion every N
iterations on rank 0 only, returns without waiting, and the snapshot (with the tokenizer) appears."""

import argparse
import json
import os
import time

import pytest

from launcher import TINY, run
from tri_megatron.config.export import ExportConfig
from tri_megatron.convert.export_hook import make_on_save


def _run_config(export_hf_interval=2, export_hf_dir=None, save=None, save_interval=2, tokenizer=None):
    """The parts of a RunConfig the exporter reads."""
    return argparse.Namespace(export=ExportConfig(export_hf_interval, export_hf_dir),
                              checkpoint=argparse.Namespace(save=save, save_interval=save_interval),
                              data=argparse.Namespace(tokenizer=tokenizer))


def _validate(export_hf_interval=2, export_hf_dir=None, save=None, save_interval=2):
    ExportConfig(export_hf_interval, export_hf_dir).validate(save, save_interval)


def test_flags_and_validation():
    parser = argparse.ArgumentParser()
    ExportConfig.add_flags(parser)
    ns = parser.parse_args(["--export-hf-interval", "4", "--export-hf-dir", "snap"])
    assert (ns.export_hf_interval, ns.export_hf_dir) == (4, "snap")
    assert parser.parse_args([]).export_hf_interval == 0
    _validate(export_hf_interval=0)
    with pytest.raises(ValueError, match="--export-hf-dir"):
        _validate()
    with pytest.raises(ValueError, match="--save"):
        _validate(export_hf_dir="d")
    with pytest.raises(ValueError, match="not a multiple of --save-interval 2"):
        _validate(export_hf_interval=3, export_hf_dir="d", save="s")


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i + 2 for i in range(1022)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)
    return path


def test_on_save_exports_in_the_background(tmp_path, megatron_single_process):
    save, snaps = str(tmp_path / "ckpt"), str(tmp_path / "snapshots")
    run(1, TINY + ["--train-iters", "2", "--save", save, "--save-interval", "2", "--no-save-optim",
                   "--mtp-num-layers", "1"])
    args = _run_config(export_hf_dir=snaps, save=save, tokenizer=_tokenizer(str(tmp_path / "tokenizer.json")))

    assert make_on_save(args, rank=1)(2) is None  # only rank 0 exports
    exporter = make_on_save(args, rank=0)
    assert exporter(1, os.path.join(save, "iter_0000001")) is None  # not an export iteration
    t0 = time.time()
    proc = exporter(2)  # checkpoint path defaults to --save/iter_0000002
    assert proc is not None and time.time() - t0 < 2.0  # returned without waiting for the conversion
    assert exporter.wait(timeout=300) == [0], open(os.path.join(snaps, "iter_0000002.log")).read()[-3000:]

    out = os.path.join(snaps, "iter_0000002")
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    assert not os.path.exists(out + "_staging")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["eos_token_id"] == 0 and cfg["tri_megatron"]["iteration"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"] == [3, 4] and tok.eos_token == "<|endoftext|>"

    # a Llama export keeps the MTP module (layer 4, ignored by LlamaForCausalLM); its logits still match
    from tri_megatron.convert.verify import check_parity

    result = check_parity(save, out, 1e-4, seq_len=32)
    assert result["max_abs_diff"] <= 1e-4 and len(result["mtp_max_abs_diff"]) == 1
    assert result["mtp_max_abs_diff"][0] <= 1e-4


def test_pretrain_writes_hf_snapshots_in_the_background(tmp_path):
    """pretrain_tri.py --export-hf-interval: a loadable HF snapshot appears for the saved iteration."""
    import json
    import time

    from launcher import TINY, train

    export = tmp_path / "hf"
    recs = train(1, [*TINY, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                     "--export-hf-interval", "2", "--export-hf-dir", str(export)], str(tmp_path / "log.jsonl"))
    assert [r["iteration"] for r in recs] == [1, 2]
    config = export / "iter_0000002" / "config.json"
    deadline = time.time() + 240
    while not config.exists() and time.time() < deadline:
        time.sleep(1)
    assert config.exists(), (export / "iter_0000002.log").read_text() if (export / "iter_0000002.log").exists() else "no log"
    cfg = json.loads(config.read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 128
    assert any(p.name.endswith(".safetensors") for p in (export / "iter_0000002").iterdir())
