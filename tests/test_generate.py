"""tools/generate.py: greedy tokens from a TP2 x PP2 checkpoint equal those of its Hugging Face export (our loop
and transformers' own ``generate``) and of the same weights saved at TP=1; top-p sampling is seed-deterministic
and samples only from the nucleus; bad input is one line, exit 2.

One tri-tiny run (TP=2 x PP=2, 4 processes, a tokenizer trained here, two iterations at a high learning rate so
the logits are not those of the initialisation).
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="tri_hf_modules_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from launcher import ROOT, TINY, run  # noqa: E402
from test_data_common import load_script, small_tokenizer  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "generate.py")
PROMPT = "The student reads"
NEW = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("generate")
    tok = small_tokenizer(base)
    save = str(base / "ckpt")
    run(4, TINY + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--tokenizer", tok,
                   "--lr", "2e-2", "--train-iters", "2", "--save", save, "--save-interval", "2"])
    return {"save": save, "tokenizer": tok, "base": base}


def _generate(argv):
    lines = []
    result = load_script("tools/generate.py").run(argv, out=lines.append)
    return result, lines


def test_greedy_same_tokens_from_tp2pp2_checkpoint_hf_export_and_tp1(trained, megatron_single_process):
    from tokenizers import Tokenizer

    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.to_hf import to_hf
    from tri_megatron.convert.verify import load_hf_model

    save, base = trained["save"], trained["base"]
    assert json.load(open(os.path.join(save, "iter_0000002", "tri_meta.json")))["layout"]["tp"] == 2
    args = ["--prompt", PROMPT, "--max-new-tokens", str(NEW), "--ignore-eos", "--show-ids"]
    ours, lines = _generate([save] + args)  # the tokenizer the trainer recorded in --save
    # greedy repeats itself after two iterations on mock data: a seeded top-p sample is compared as well
    sample = ["--top-p", "0.95", "--temperature", "1.5", "--seed", "3"]
    ours_sampled, _ = _generate([save] + args + sample)
    assert len(set(ours_sampled["new"])) > NEW // 2
    tok = Tokenizer.from_file(os.path.join(trained["tokenizer"], "tokenizer.json"))
    assert ours["prompt"] == tok.encode(PROMPT, add_special_tokens=False).ids
    assert len(ours["new"]) == NEW
    assert lines[0] == tok.decode(ours["prompt"] + ours["new"], skip_special_tokens=False)
    assert lines[0].startswith(PROMPT)

    hf = str(base / "hf")
    to_hf(save, hf)
    from_export, _ = _generate([hf] + args)
    assert from_export["new"] == ours["new"]
    assert _generate([hf] + args + sample)[0]["new"] == ours_sampled["new"]
    model = load_hf_model(hf)  # transformers' own generate (KV cache), an independent implementation
    prompt = torch.tensor([ours["prompt"]])
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert theirs[0, prompt.shape[1]:].tolist() == ours["new"]

    tp1 = str(base / "tp1")
    from_hf(hf, tp1, target_tp=1, target_pp=1)  # the same weights saved at TP=1
    at_tp1, _ = _generate([tp1, "--tokenizer", trained["tokenizer"]] + args)
    assert at_tp1["new"] == ours["new"]
    assert _generate([tp1] + args + sample)[0]["new"] == ours_sampled["new"]  # from_hf copied the tokenizer


def test_top_p_sampling_is_seed_deterministic(trained, megatron_single_process):
    args = [trained["save"], "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--ignore-eos",
            "--top-p", "0.95", "--temperature", "1.5"]
    a, _ = _generate(args + ["--seed", "1"])
    b, _ = _generate(args + ["--seed", "1"])
    c, _ = _generate(args + ["--seed", "2"])
    assert a["new"] == b["new"] and len(a["new"]) == NEW
    assert a["new"] != c["new"]


def test_top_p_filter_keeps_the_nucleus_only():
    from tri_megatron.convert.generate import pick, top_p_filter

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    for p, nucleus in [(0.5, {1}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.96, {0, 1, 2, 3}),
                       (1.0, {0, 1, 2, 3})]:
        kept = {i for i, x in enumerate(top_p_filter(logits, p).tolist()) if x != float("-inf")}
        assert kept == nucleus, (p, kept)
    g = torch.Generator().manual_seed(0)
    draws = [pick(logits, 1.0, 0.8, g) for _ in range(400)]
    assert set(draws) == {1, 3}
    assert 0.5 < draws.count(1) / len(draws) < 0.75  # 0.5 / 0.8 = 0.625 within the nucleus
    assert pick(logits, 0.0, 0.5, None) == 1  # temperature 0: greedy


def test_cli_prints_text_and_rejects_bad_input(trained, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TOOL, trained["save"], "--prompt", PROMPT, "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(PROMPT) and "greedy" in proc.stderr
    gen = load_script("tools/generate.py")
    no_tok = str(tmp_path / "no_tokenizer")
    os.makedirs(no_tok)
    os.symlink(os.path.join(trained["save"], "iter_0000002"), os.path.join(no_tok, "iter_0000002"))
    for argv, says in [([trained["save"], "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
                       ([trained["save"], "--prompt", "x", "--temperature", "0"], "--temperature 0: must be > 0"),
                       ([trained["save"], "--prompt-ids", "1,99999"], "[99999] outside the vocabulary"),
                       ([trained["save"], "--prompt-ids", "1", "--max-new-tokens", "300"], "context length 256"),
                       ([os.path.join(no_tok, "iter_0000002"), "--prompt", "x"], "--prompt needs a tokenizer"),
                       ([str(tmp_path / "nowhere"), "--prompt-ids", "1"], "no such directory")]:
        with pytest.raises(Exception) as err:
            gen.run(argv, out=lambda _: None)
        assert type(err.value).__name__ == "GenerateError" and says in str(err.value), (argv, err.value)
    assert gen.main([trained["save"], "--prompt", "x", "--top-p", "0"]) == 2
