"""Megatron-LM compatibility (tri_megatron/config/megatron_flags.py): a pretrain_gpt.py command line is
accepted with Megatron's meaning, checked against the preset, or refused in one line; argument errors are
one line, printed once under torchrun."""

import math

import pytest
import torch

from launcher import TINY, run
from tri_megatron.config import ArgumentError, load_run_config
from tri_megatron.config.megatron_flags import MEGATRON_FLAGS

# What a Megatron-LM user's pretrain_gpt.py script passes (Llama-style model, sample-based schedule).
MEGATRON_ARGS = [
    "--use-mcore-models", "--group-query-attention", "--swiglu", "--normalization", "RMSNorm",
    "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--use-flash-attn", "--distributed-backend", "nccl",
    "--ckpt-format", "torch_dist", "--attention-backend", "fused", "--make-vocab-size-divisible-by", "128",
    "--train-samples", "160", "--lr-decay-samples", "120", "--lr-warmup-samples", "16",
    "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "exponential", "--lr-wsd-decay-samples", "40",
    "--no-masked-softmax-fusion", "--init-method-std", "0.01", "--weight-decay", "0.05",
    "--recompute-activations", "--dataloader-type", "single", "--log-timers-to-tensorboard",
]


def _cfg(argv, world_size=1):
    return load_run_config([*TINY, *argv], world_size=world_size, rank=0, check_disk=False)


def test_megatron_command_line_resolves_with_megatron_meaning():
    cfg = _cfg(MEGATRON_ARGS)  # TINY: global batch 8
    assert cfg.training.train_iters == 20  # 160 samples / 8
    assert cfg.optim.lr_decay_iters == 15 and cfg.optim.lr_warmup_iters == 2 and cfg.optim.lr_wsd_decay_iters == 5
    assert cfg.optim.lr_decay_style == "WSD" and cfg.optim.lr_wsd_decay_style == "exponential"
    assert cfg.training.attention_backend == "fused"
    assert cfg.arch.init_method_std == 0.01 and cfg.optim.weight_decay == 0.05
    assert cfg.training.recompute_granularity == "selective"
    assert "--train-samples 160" in cfg.megatron_flags and "--swiglu" in cfg.megatron_flags


def test_attention_backend_reaches_megatron_core():
    from megatron.core.transformer.enums import AttnBackend

    from tri_megatron.model.config import transformer_config
    from tri_megatron.runtime import resolve

    cfg = _cfg(["--attention-backend", "flash"])
    assert transformer_config(cfg, use_te=False, rt=resolve("cpu")).attention_backend == AttnBackend.flash


def test_wsd_decay_style_reaches_the_scheduler():
    """--lr-wsd-decay-style shapes the WSD tail: at the tail's midpoint linear is halfway between lr and
    min-lr; exponential has fallen further."""
    from tri_megatron.training.optimizer import build_scheduler

    lrs = {}
    for style in ("linear", "exponential"):
        cfg = _cfg(["--train-iters", "20", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10",
                    "--lr", "1.0", "--min-lr", "0.0", "--lr-wsd-decay-style", style])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, cfg.optim, cfg.training.global_batch_size, cfg.training.train_iters)
        sched.step(increment=15 * cfg.training.global_batch_size)  # halfway through the 10-iteration tail
        lrs[style] = opt.param_groups[0]["lr"]
    assert math.isclose(lrs["linear"], 0.5, rel_tol=1e-6)
    assert lrs["exponential"] < 0.5 - 1e-3


@pytest.mark.parametrize("flag,value", [("--normalization", "LayerNorm"),
                                        ("--position-embedding-type", "learned_absolute")])
def test_contradicting_architecture_names_the_preset(flag, value):
    with pytest.raises(ArgumentError, match=f"{flag} {value} contradicts the tri-tiny preset"):
        _cfg([flag, value])


@pytest.mark.parametrize("argv,match", [
    (["--fp16"], "--fp16: refused: .*--bf16"),
    (["--num-experts", "8"], "--num-experts: refused: Tri models are dense"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "HuggingFaceTokenizer"),
    (["--ckpt-format", "torch"], "only torch_dist"),
    (["--attention-dropout", "0.1"], "without dropout"),
    (["--attention-backend", "local"], "unfused attention is never used"),
    (["--train-samples", "81"], "not a whole number of iterations of --global-batch-size 8"),
    (["--train-samples", "80", "--train-iters", "10"], "pass one of them"),
    (["--train-iters", "10", "--lr-warmup-fraction", "0.05"], "--lr-warmup-iters 0"),
    (["--make-vocab-size-divisible-by", "100"], "pads to a multiple of 128"),
    (["--vocab-file", "gpt2-vocab.json"], "tokenizer.json"),
    (["--dataloader-type", "cyclic"], "only the single"),
    (["--lr-warmup-init", "1e-5"], "warm-up starts from 0"),
])
def test_unsupported_is_refused_in_one_line(argv, match):
    with pytest.raises(ArgumentError, match=match) as e:
        _cfg(argv)
    assert "\n" not in str(e.value)


def test_warmup_fraction_converts_exactly():
    cfg = _cfg(["--train-iters", "40", "--lr-warmup-fraction", "0.05"])
    assert cfg.optim.lr_warmup_iters == 2


def test_vocab_divisor_that_pads_like_ours_is_accepted_at_tp2():
    assert _cfg(["--make-vocab-size-divisible-by", "64", "--tensor-model-parallel-size", "2"],
                world_size=2).arch.padded_vocab_size(2) == 1024


def test_tokenizer_model_is_tokenizer():
    cfg = _cfg(["--tokenizer-model", "/data/tok", "--vocab-size", "1024"])
    assert cfg.data.tokenizer == "/data/tok"


def test_table_has_no_duplicates_and_every_kind_has_a_reason():
    flags = [f.flag for f in MEGATRON_FLAGS]
    assert len(flags) == len(set(flags))
    assert all(f.kind in ("accepted", "checked", "ignored", "refused") and f.reason for f in MEGATRON_FLAGS)
    from tri_megatron.config import build_parser

    assert "--use-mcore-models" in build_parser().format_help()  # the help text renders (argparse %-formats it)


def test_argument_error_is_one_line_once_under_torchrun():
    """An unknown flag under torchrun (2 ranks): one error line in all, no usage text."""
    proc = run(2, [*TINY, "--train-iters", "1", "--no-such-flag"], check=False, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "pretrain_tri.py" in line]
    assert errors == ["pretrain_tri.py: error: unrecognized arguments: --no-such-flag (pretrain_tri.py --help "
                      "lists the flags; README: Coming from Megatron-LM)"], proc.stderr[-3000:]
    assert "usage:" not in proc.stderr and "usage:" not in proc.stdout


def test_argument_error_is_printed_when_rank_0_starts_late():
    """Rank 0 reads its command line 5 s after rank 1, as on a loaded node: rank 1 waits to be stopped
    instead of exiting first (torchrun would then stop rank 0 before it prints), so the line is there."""
    proc = run(2, [*TINY, "--train-iters", "1", "--no-such-flag"], check=False, timeout=300,
               extra_env={"TRI_TEST_START_DELAY": "0:5"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "pretrain_tri.py" in line]
    assert len(errors) == 1 and "--no-such-flag" in errors[0] and "(rank" not in errors[0], proc.stderr[-3000:]


def test_argument_error_on_a_rank_whose_rank_0_did_not_fail(monkeypatch, capsys):
    """A rank other than 0 whose check fails, and which nobody stops after the grace period (rank 0 passed
    it), says so itself, naming its rank, and exits 2."""
    import pretrain_tri

    monkeypatch.setattr(pretrain_tri, "ERROR_GRACE_S", 0.1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as e:
        pretrain_tri.check_before_start([*TINY, "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain_tri.py: error: unrecognized arguments: --no-such-flag")
    assert err[0].endswith("(rank 3)"), err


def test_megatron_lm_style_script_parses(tmp_path):
    """examples/megatron_lm_style.sh, unchanged, hands torchrun a command line that resolves (a stand-in
    torchrun prints it); the script itself runs end to end in the README's closing example."""
    import os
    import subprocess

    from launcher import ROOT

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (fake / "torchrun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "megatron_lm_style.sh"), str(tmp_path / "ckpt"),
                          str(tmp_path / "tb"), "/data/tokenizer", "/data/web_text_document"],
                         env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    argv = out[out.index("pretrain_tri.py") + 1:-1]
    cfg = load_run_config([*argv, "--vocab-size", "1536"], world_size=2, rank=0, check_disk=False)
    assert cfg.parallel.tp == 2 and cfg.training.train_iters == 30 and cfg.optim.lr_warmup_iters == 5
    assert cfg.optim.lr_wsd_decay_iters == 10 and cfg.data.tokenizer == "/data/tokenizer"
