"""Optional integrations (issue 16 item 4) without their packages installed: Weights & Biases through a
fake ``wandb`` module put on the path of a training subprocess, asserting what the trainer hands it (the
run's configuration, offline mode from WANDB_MODE, one log per iteration with the --log-json values,
the validation losses, finish). The profiler's traces are tested in tests/test_console.py."""

import json

import pytest

from launcher import TINY, train

FAKE_WANDB = '''
"""A stand-in for wandb: records every call as one JSON line in $FAKE_WANDB_OUT."""
import json, os

def _write(**call):
    with open(os.environ["FAKE_WANDB_OUT"], "a") as f:
        f.write(json.dumps(call) + "\\n")

def init(**kwargs):
    _write(call="init", **kwargs)
    return object()

def log(data, step=None):
    _write(call="log", data=data, step=step)

def finish():
    _write(call="finish")
'''


def test_wandb_receives_the_run_config_and_every_record(tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    out = tmp_path / "wandb_calls.jsonl"
    records = train(1, [*TINY, "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1", "--save",
                        str(tmp_path / "ckpt"), "--wandb-project", "tri-test", "--wandb-exp-name", "tiny-1"],
                    str(tmp_path / "log.jsonl"), virtual=False,
                    extra_env={"PYTHONPATH": str(tmp_path / "fake"), "FAKE_WANDB_OUT": str(out),
                               "WANDB_MODE": "offline"})
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["init", "log", "log", "log", "log", "finish"]
    init = calls[0]
    assert init["project"] == "tri-test" and init["name"] == "tiny-1" and init["mode"] == "offline"
    assert init["dir"] == str(tmp_path / "ckpt" / "wandb")  # --wandb-save-dir default, as Megatron
    assert init["config"]["training"]["train_iters"] == 3 and init["config"]["arch"]["name"] == "tri-tiny"
    logs = [c for c in calls if c["call"] == "log"]
    train_logs = [c for c in logs if "train/lm_loss" in c["data"]]
    assert [c["step"] for c in train_logs] == [1, 2, 3]
    for c, r in zip(train_logs, records):
        assert c["data"]["train/lm_loss"] == pytest.approx(r["lm_loss"], rel=1e-12)
        assert c["data"]["train/consumed_tokens"] == r["consumed_tokens"]
        assert c["data"]["train/lr"] == pytest.approx(r["lr"], rel=1e-12)
    valid = [c for c in logs if "valid/mock_loss" in c["data"]]
    assert len(valid) == 1 and valid[0]["step"] == 3
