"""The fused MTP loss (gradients computed in its forward) under megatron-core's own pipeline schedule.

In one process: the model with ``--fused-mtp-loss`` and the stock model (output layer + megatron's
vocab-parallel CE per head), both DDP-wrapped, run one global batch of 4 micro-batches through
``get_forward_backward_func()`` with a loss scale != 1 (``config.grad_scale_func``, as megatron's
fp16 grad scaler sets it), with and without full activation recompute and per-token loss. Every
main_grad must match the stock model's, and the fused op must have put its weight gradient into
main_grad in the forward with the right factor (no recomputation) from the second micro-batch on: the
upstream megatron's schedule and ``MTPLossAutoScaler`` send is the one the model declares in forward,
up to the factor learned from the first. Evaluation (forward_only, no grad mode) computes no gradients.
"""

import pytest
import torch

from tri_megatron.mcore_internals import clear_mtp_tracker
from tri_megatron.ops import ce_chunks
from tri_megatron.ops import fused_cross_entropy as fce

LOSS_SCALE = 1024.0
MICRO_BATCHES = 4


def _build(extra):
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config
    from tri_megatron.training.optimizer import wrap_ddp

    run = load_run_config(["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--mtp-num-layers", "2",
                           *extra], world_size=1, rank=0)
    cfg = transformer_config(run, False)
    model = build_model_chunks(cfg, run, False)[0]
    return model, cfg, run, lambda chunks, config, run: wrap_ddp(chunks, config, run.parallel)


def _batches(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO_BATCHES):
        mask = (torch.rand(2, 32, generator=g) > 0.2).float()
        out.append(dict(tokens=torch.randint(0, vocab, (2, 32), generator=g),
                        labels=torch.randint(0, vocab, (2, 32), generator=g),
                        position_ids=torch.arange(32).expand(2, -1), loss_mask=mask))
    return out


def _run(model, cfg, batches, forward_only=False):
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tri_megatron.training.loop import Trainer

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
        return out, partial(Trainer._loss_func, b["loss_mask"])

    cfg.grad_scale_func = lambda t: t * LOSS_SCALE
    return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=model,
                                       num_microbatches=MICRO_BATCHES, seq_length=32, micro_batch_size=2,
                                       forward_only=forward_only)


@pytest.mark.parametrize("extra", [[], ["--recompute-granularity", "full"], ["--calculate-per-token-loss"]],
                         ids=["plain", "full_recompute", "per_token_loss"])
def test_fused_loss_in_megatron_schedule_matches_unfused(megatron_single_process, extra):
    fused, cfg, args, wrap_ddp = _build(["--fused-loss", *extra])
    ref, ref_cfg, _, _ = _build(["--no-fused-loss", *extra])
    ref.load_state_dict(fused.state_dict())
    ddp_fused = wrap_ddp([fused], cfg, args)[0]
    ddp_ref = wrap_ddp([ref], ref_cfg, args)[0]
    batches = _batches(args.arch.vocab_size)

    before = dict(fce.backward_path_counts)
    got = _run(ddp_fused, cfg, batches)
    clear_mtp_tracker()
    # under DDP the op adds its weight gradient into main_grad in the forward, scaled by the factor it
    # last saw (none yet: 1): the first micro-batch corrects it (recompute with the difference), the
    # other three find LOSS_SCALE / MICRO_BATCHES learned and do nothing more
    assert fce.backward_path_counts["corrected"] == before["corrected"] + 1
    assert fce.backward_path_counts["stored"] == before["stored"] + MICRO_BATCHES - 1
    assert fce.backward_path_counts["recomputed"] == before["recomputed"]
    want = _run(ddp_ref, ref_cfg, batches)
    clear_mtp_tracker()
    for a, b in zip(got, want):
        torch.testing.assert_close(a["lm loss"], b["lm loss"], rtol=1e-6, atol=1e-6)
    n = 0
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        scale = max(q.main_grad.abs().max().item(), 1e-30)
        torch.testing.assert_close(p.main_grad / scale, q.main_grad / scale, rtol=1e-5, atol=1e-5, msg=name)
        n += 1
    assert n > 0 and fused.output_layer.weight.main_grad.abs().sum() > 0
    # the loss scale really reached the gradients: they are LOSS_SCALE x the unscaled ones
    assert fused.output_layer.weight.main_grad.abs().max() > 1.0


def test_evaluation_computes_no_gradients(megatron_single_process, monkeypatch):
    """forward_only (megatron's evaluation, under no_grad): the fused op runs its logits GEMMs only."""
    fused, cfg, args, wrap_ddp = _build(["--fused-loss"])
    ddp_fused = wrap_ddp([fused], cfg, args)[0]
    calls = []
    real = ce_chunks.chunk_grad_inplace
    monkeypatch.setattr(ce_chunks, "chunk_grad_inplace", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        losses = _run(ddp_fused, cfg, _batches(args.arch.vocab_size, seed=1), forward_only=True)
    assert len(losses) == MICRO_BATCHES and not calls
    assert all(p.main_grad.abs().sum() == 0 for p in fused.parameters())
