"""Bad settings fail before anything is built: one line naming the flag, exit code 2, nothing written."""

import os

import pytest

from launcher import TINY, run


def _fails(args, nproc=1, match=None, tmp_path=None):
    proc = run(nproc, args, check=False, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "pretrain_tri.py: error:" in line]
    assert errors, proc.stderr[-2000:]
    assert match in errors[0], errors[0]
    if nproc == 1:
        assert proc.returncode == 2
    return errors[0]


CASES = {
    "heads_not_divisible_by_tp": (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
                                      "--num-query-groups", "3", "--kv-channels", "32"], "--num-attention-heads 3"),
    "groups_not_divisible_by_tp": (1, ["--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
                                   "world size 1"),
    "layers_not_divisible_by_pp_vpp": (2, ["--pipeline-model-parallel-size", "2",
                                          "--virtual-pipeline-model-parallel-size", "3"], "--num-layers 4"),
    "batch_not_divisible": (1, ["--global-batch-size", "7"], "--global-batch-size 7"),
    "seq_over_context": (1, ["--seq-length", "512"], "--max-position-embeddings 512"),
    "fp8_without_te": (1, ["--fp8-format", "hybrid"], "--fp8-format hybrid"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flags(case, tmp_path):
    nproc, extra, match = CASES[case]
    save = tmp_path / "save"
    _fails([*TINY, "--train-iters", "1", "--save", str(save), *extra], nproc=nproc, match=match)
    assert not save.exists()


def test_groups_not_divisible_by_tp_message():
    from tri_megatron.config import ArgumentError, load_run_config

    argv = [*TINY, "--num-query-groups", "1", "--num-attention-heads", "4", "--tensor-model-parallel-size", "2"]
    with pytest.raises(ArgumentError, match="--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"):
        load_run_config(argv, world_size=2, rank=0)


@pytest.mark.parametrize("extra, match", [
    (["--no-rope-freq", "2", "--mtp-num-layers", "2"], "--mtp-num-layers 2 with --no-rope-freq 2"),
    (["--num-layers", "3", "--window-size", "16", "--window-attn-skip-freq", "2", "--mtp-num-layers", "1"],
     "--mtp-num-layers 1 with --window-attn-skip-freq 2 and --num-layers 3"),
])
def test_mtp_layer_pattern_that_depends_on_the_megatron_release(extra, match):
    """MTP layers are numbered L+d up to megatron-core 0.18 and d from 0.19: patterns where that changes
    NoPE or windows are refused; the same settings with numberings that agree are accepted."""
    from tri_megatron.config import ArgumentError, load_run_config

    with pytest.raises(ArgumentError, match=match):
        load_run_config([*TINY, *extra], world_size=1, rank=0)
    load_run_config([*TINY, "--no-rope-freq", "2", "--mtp-num-layers", "1"], world_size=1, rank=0)
    load_run_config([*TINY, "--num-layers", "4", "--window-size", "16", "--window-attn-skip-freq", "2",
                     "--mtp-num-layers", "2"], world_size=1, rank=0)


def test_load_without_checkpoint(tmp_path):
    _fails([*TINY, "--train-iters", "1", "--load", str(tmp_path / "nothing")], match="--load")


def test_load_checkpoint_of_another_shape(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(1, [*TINY, "--train-iters", "0", "--save", str(ckpt), "--no-save-optim"])
    before = sorted(os.listdir(ckpt))
    line = _fails([*TINY, "--train-iters", "1", "--hidden-size", "64", "--load", str(ckpt), "--save", str(ckpt)],
                  match="hidden_size=128")
    assert "--hidden-size 64" in line
    assert sorted(os.listdir(ckpt)) == before


def test_vocab_that_does_not_split_over_tp(monkeypatch, capsys, tmp_path):
    import pretrain_tri

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:
        pretrain_tri.check_before_start([*TINY, "--tensor-model-parallel-size", "3", "--num-attention-heads", "6",
                                         "--num-query-groups", "3", "--global-batch-size", "6",
                                         "--save", str(tmp_path / "s")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "does not split over --tensor-model-parallel-size 3" in err
    assert not (tmp_path / "s").exists()
