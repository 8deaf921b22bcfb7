"""Resuming across optimizer kinds and data-parallel sizes, and what a load takes (issue 15 item 3):
a plain-optimizer checkpoint continues under --use-distributed-optimizer at DP2 (and back at DP1) exactly
as the run that never switched; --finetune, --no-load-optim and --no-load-rng with Megatron's meaning."""

import os

import pytest
import torch

from launcher import TINY, dcp_tensors as _tensors, train


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """A: plain Adam at DP1, 4 iterations, checkpoints at 2 and 4 (the run that never switches).
    B: from A's iteration 2, the distributed optimizer at DP2 to iteration 4, checkpoints at 3 and 4."""
    d = tmp_path_factory.mktemp("switch")
    a = train(1, [*TINY, "--train-iters", "4", "--save", str(d / "a"), "--save-interval", "2"], str(d / "a.jsonl"))
    b = train(2, [*TINY, "--train-iters", "4", "--load", str(d / "a" / "iter_0000002"), "--save", str(d / "b"),
                  "--save-interval", "1", "--use-distributed-optimizer"], str(d / "b.jsonl"))
    return {"dir": d, "a": {r["iteration"]: r for r in a}, "b": {r["iteration"]: r for r in b}}


def test_plain_checkpoint_continues_with_the_distributed_optimizer_at_dp2(switched):
    a, b = switched["a"], switched["b"]
    assert sorted(b) == [3, 4]
    for it in (3, 4):
        assert b[it]["lm_loss"] == pytest.approx(a[it]["lm_loss"], abs=1e-5), it
        assert b[it]["lr"] == a[it]["lr"]
    # the Adam moments and the fp32 main weights after iteration 4 are the never-switched run's
    ta = _tensors(str(switched["dir"] / "a" / "iter_0000004"))
    tb = _tensors(str(switched["dir"] / "b" / "iter_0000004"))
    moments = [k for k in ta if k.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."))]
    assert len(moments) >= 10 and set(moments) <= set(tb)
    for k in moments:
        assert ta[k].abs().max() > 0, k
        # data-parallel sums in another order: equal to ~1e-7 of the tensor's scale (a fresh Adam is off by ~1)
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-3, atol=1e-4 * ta[k].abs().max().item(), msg=k)
    mains = [k for k in tb if k.startswith("optimizer.state.param.")]
    assert len(mains) == len(moments) // 2
    start = _tensors(str(switched["dir"] / "a" / "iter_0000002"))  # where both runs began iteration 3
    for k in mains:  # plain fp32 Adam's main weights are the model weights
        name = k[len("optimizer.state.param."):]
        step, diff = ta[name] - start[name], tb[k] - ta[name]
        assert step.abs().max() > 0, name
        # the two iterations' update, to ~1e-5 of its size: DP1 accumulates four micro-batches in one sum,
        # DP2 two per rank, and Adam magnifies that rounding on rows with tiny gradients (an embedding
        # row differs by 2e-3 of its update on the plain CPU path); a lost optimizer state is off by ~1
        assert diff.norm() <= 1e-4 * step.norm(), (name, (diff.norm() / step.norm()).item())
        assert diff.abs().max() <= 1e-2 * step.abs().max(), (name, diff.abs().max().item())


def test_distributed_checkpoint_at_dp2_continues_with_plain_adam_at_dp1(switched):
    c = train(1, [*TINY, "--train-iters", "4", "--load", str(switched["dir"] / "b" / "iter_0000003")],
              str(switched["dir"] / "c.jsonl"))
    assert [r["iteration"] for r in c] == [4]
    assert c[0]["lm_loss"] == pytest.approx(switched["b"][4]["lm_loss"], abs=1e-5)
    assert c[0]["lm_loss"] == pytest.approx(switched["a"][4]["lm_loss"], abs=1e-5)


def test_distributed_checkpoint_at_dp2_continues_distributed_at_dp1(switched):
    d = train(1, [*TINY, "--train-iters", "4", "--load", str(switched["dir"] / "b" / "iter_0000003"),
                  "--use-distributed-optimizer"], str(switched["dir"] / "d.jsonl"))
    assert [r["iteration"] for r in d] == [4]
    assert d[0]["lm_loss"] == pytest.approx(switched["b"][4]["lm_loss"], abs=1e-5)


# ------------------------------------------------------------------ --finetune, --no-load-optim, --no-load-rng
def _adam(trainer) -> dict:
    """param -> (exp_avg, step) of the (plain) optimizer's torch Adam."""
    inner = [o.optimizer for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])]
    return {p: s for opt in inner for p, s in opt.state.items()}


def _mains(trainer) -> list:
    opt = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])[0]
    return [m for g32 in opt.fp32_from_float16_groups for m in g32]


def _main_weights_follow_the_model(trainer) -> bool:
    """The bf16 optimizer's fp32 main weights equal its (bf16) model weights."""
    opt = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])[0]
    pairs = [(m, p) for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups) for p, m in zip(g16, g32)]
    return len(pairs) > 10 and all(torch.equal(m, p.detach().float()) for m, p in pairs)


@pytest.fixture(scope="module")
def saved_in_process(megatron_single_process, tmp_path_factory):
    """Two bf16 steps of tri-tiny in this process, saved at iteration 2: (trainer, checkpoint dir)."""
    from tri_megatron.config import load_run_config
    from tri_megatron.training.loop import Trainer

    save = str(tmp_path_factory.mktemp("inproc") / "ckpt")
    cfg = load_run_config([*TINY, "--bf16", "--train-iters", "2", "--save", save], world_size=1, rank=0)
    trainer = Trainer(cfg)
    from tri_megatron.training.mock_data import MockData

    tr = cfg.training
    data = MockData(tr.seq_length, cfg.arch.vocab_size, tr.micro_batch_size, 0, 1, tr.seed, config=cfg.data)
    it = data.train_iterator(0)
    for _ in range(2):
        trainer.train_step(it)
        trainer.iteration += 1
        trainer.consumed_samples += tr.global_batch_size
    trainer.save()
    return trainer, save


def _load(save, *flags):
    from tri_megatron.config import load_run_config
    from tri_megatron.training.loop import Trainer

    torch.manual_seed(99)  # other initial weights than the saved ones
    cfg = load_run_config([*TINY, "--bf16", "--train-iters", "4", "--load", save, *flags], world_size=1, rank=0)
    return Trainer(cfg)


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.model[0].parameters(), b.model[0].parameters()))


def test_full_load_restores_optimizer_schedule_and_rng(saved_in_process):
    saved, path = saved_in_process
    rng = torch.load(os.path.join(path, "iter_0000002", "rng", "rank00000.pt"), weights_only=False)
    t = _load(path)
    assert (t.iteration, t.consumed_samples) == (2, 16)
    assert _same_weights(t, saved)
    assert t.scheduler.num_steps == 16
    moments = [s["exp_avg"] for s in _adam(t).values()]
    assert moments and all(m.abs().max() > 0 for m in moments)
    assert all(float(s["step"]) == 2 for s in _adam(t).values())
    assert all(torch.equal(m, n) for m, n in zip(_mains(t), _mains(saved)))  # fp32, not the bf16 weights
    assert not _main_weights_follow_the_model(t)
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_no_load_optim_keeps_a_fresh_optimizer_and_schedule(saved_in_process):
    saved, path = saved_in_process
    t = _load(path, "--no-load-optim")
    assert (t.iteration, t.consumed_samples) == (2, 16)  # Megatron: the iteration is still loaded
    assert _same_weights(t, saved)
    assert t.scheduler.num_steps == 0
    assert not any(s["exp_avg"].abs().max() > 0 for s in _adam(t).values() if "exp_avg" in s)
    assert _main_weights_follow_the_model(t)  # the loaded weights, not the fresh initialisation


def test_no_load_rng_keeps_this_runs_rng(saved_in_process):
    _, path = saved_in_process
    rng = torch.load(os.path.join(path, "iter_0000002", "rng", "rank00000.pt"), weights_only=False)
    t = _load(path, "--no-load-rng")
    assert (t.iteration, t.consumed_samples) == (2, 16) and t.scheduler.num_steps == 16
    assert not torch.equal(torch.get_rng_state(), rng["torch"])


def test_finetune_loads_the_weights_only(saved_in_process):
    saved, path = saved_in_process
    rng = torch.load(os.path.join(path, "iter_0000002", "rng", "rank00000.pt"), weights_only=False)
    t = _load(path, "--finetune")
    assert (t.iteration, t.consumed_samples) == (0, 0)
    assert _same_weights(t, saved)
    assert t.scheduler.num_steps == 0
    assert not any(s["exp_avg"].abs().max() > 0 for s in _adam(t).values() if "exp_avg" in s)
    assert not torch.equal(torch.get_rng_state(), rng["torch"])
    assert _main_weights_follow_the_model(t)


@pytest.mark.parametrize("flags,message", [
    (["--finetune"], "--finetune needs --load"),
    (["--finetune", "--load", "{d}", "--save", "{d}"], "--finetune --load"),
    (["--async-save"], "--async-save needs --save"),
    (["--keep-last-n", "2"], "--keep-last-n needs --save"),
    (["--keep-last-n", "-1", "--save", "{d}"], "--keep-last-n -1: must be >= 1"),
])
def test_bad_checkpoint_flag_combinations_exit_2(flags, message, tmp_path, monkeypatch, capsys):
    import pretrain_tri

    src = tmp_path / "ckpt"
    (src / "iter_0000001").mkdir(parents=True)
    for name in ("tri_meta.json", "metadata.json"):
        (src / "iter_0000001" / name).write_text("{}")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        pretrain_tri.check_before_start([*TINY, *[f.format(d=src) for f in flags]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], err
