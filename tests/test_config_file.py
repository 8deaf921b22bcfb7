"""--config run.yaml (tri_megatron/config/config_file.py): any flag from a file, the command line wins, bad
keys and values name the key and the file; the examples/configs files resolve; the resolved configuration
is printed at start and stored in every checkpoint's tri_meta.json."""

import glob
import json
import os

import pytest

from launcher import ROOT, TINY, run
from tri_megatron.config import ArgumentError, load_run_config


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _cfg(argv, world_size=1):
    return load_run_config(argv, world_size=world_size, rank=0, check_disk=False)


def test_file_flags_and_command_line_override(tmp_path):
    path = _write(tmp_path, "model: tri-tiny\nmock_data: true\nseq-length: 64\nglobal_batch_size: 16\n"
                            "lr: 3e-4\nno_rope_freq: 2\nfused_loss: false\nlr_decay_style: WSD\n"
                            "train_samples: 320\nnormalization: RMSNorm\n")
    cfg = _cfg(["--config", path, "--global-batch-size", "8"])
    assert cfg.training.seq_length == 64 and cfg.optim.lr == 3e-4 and cfg.arch.no_rope_freq == 2
    assert cfg.training.fused_loss is False  # false -> the --no- form
    assert cfg.training.global_batch_size == 8  # the command line wins ...
    assert cfg.training.train_iters == 40  # ... and the file's samples are converted with its value
    assert _cfg([f"--config={path}"]).training.global_batch_size == 16


def test_list_values(tmp_path):
    path = _write(tmp_path, "mock_data: true\ninject_nan_at_iter: [3, 5]\n")
    assert _cfg([*TINY, "--config", path]).inject_nan_at_iter == (3, 5)


@pytest.mark.parametrize("text,match", [
    ("global_batch_sise: 8\n", "unknown key 'global_batch_sise'"),
    ("lr: fast\n", "invalid float value: 'fast'"),
    ("bf16: 3\n", "key 'bf16' is a switch"),
    ("- lr\n", "must be a mapping"),
    ("model: tri-huge\n", "invalid choice: 'tri-huge'"),
])
def test_bad_file_names_key_and_file(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ArgumentError, match=match) as e:
        _cfg([*TINY, "--config", path])
    assert f"--config {path}" in str(e.value) and "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ArgumentError, match="--config /nonexistent.yaml: no such file"):
        _cfg(["--config", "/nonexistent.yaml"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml"))))
def test_example_configs_resolve(path, tmp_path):
    name = os.path.basename(path)[:-len(".yaml")]
    world = 2 if name == "tri-tiny" else 512  # the layouts are sized for 64 nodes x 8 GPUs
    extra = ["--mock-data", "--save", str(tmp_path / "ckpt")]
    cfg = _cfg(["--config", path, *extra], world_size=world)
    assert cfg.arch.name == name
    assert cfg.parallel.sequence_parallel == ("sequence_parallel: true" in open(path).read())


def test_resolved_config_printed_and_stored_in_checkpoint(tmp_path):
    path = _write(tmp_path, "train_iters: 1\nlog_interval: 1\n")
    save = tmp_path / "ckpt"
    proc = run(1, [*TINY, "--config", path, "--save", str(save), "--no-save-optim", "--use-mcore-models"])
    assert "resolved configuration" in proc.stdout and "train_iters=1" in proc.stdout
    metas = glob.glob(str(save / "iter_*" / "tri_meta.json"))
    assert metas
    stored = json.load(open(metas[0]))["run_config"]
    assert stored["training"]["train_iters"] == 1 and stored["arch"]["name"] == "tri-tiny"
    assert stored["checkpoint"]["save"] == str(save) and stored["megatron_flags"] == ["--use-mcore-models"]
    assert stored["training"]["seq_length"] == 64 and stored["optim"]["lr"] == 1e-3
