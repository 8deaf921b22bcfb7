"""Fused linear + softmax cross-entropy (tri_megatron.ops.fused_cross_entropy) against naive oracles.

Oracles: full logits + ``torch.nn.functional.cross_entropy`` in float64 (values and autograd
gradients), megatron-core's own vocab-parallel CE math (``VocabParallelCrossEntropy``'s steps) at
TP=1 on bf16 logits, ``gradcheck`` of the hand-written backward, and a real TP=2 run under gloo whose
losses and (all-reduced / gathered) gradients must equal the single-process full-vocab computation.
Kernel tests (kernel vs reference) run on a GPU -- skipped only when no CUDA device is present --
and on the CPU emulator of the same kernel source (tests/kernel_emulator.py), at smaller sizes.
"""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from tri_megatron.ops import fused_cross_entropy as fce
from tri_megatron.ops.fused_cross_entropy import (
    fused_linear_cross_entropy,
    fused_mtp_cross_entropy,
    reference_mtp_cross_entropy,
)

torch.set_num_threads(1)
IGNORE = -100


def _naive(hiddens, weight, labels_list, masks, scales, z=0.0):
    """Full-vocab per-token losses [b, s] (zero where masked / ignored)."""
    out = []
    for x, lab, mask, sc in zip(hiddens, labels_list, masks, scales):
        logits = torch.einsum("sbh,vh->bsv", x, weight)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), reduction="none",
                             ignore_index=IGNORE).view_as(lab)
        lse = torch.logsumexp(logits, dim=-1)
        loss = ce + z * lse * lse
        keep = (lab != IGNORE) & (mask != 0 if mask is not None else True)
        out.append(torch.where(keep, loss, torch.zeros_like(loss)) * sc)
    return out


def _problem(S=5, B=2, H=6, V=11, heads=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(S, B, H, generator=g, dtype=dtype) for _ in range(heads)]
    w = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    labels = [torch.randint(0, V, (B, S), generator=g) for _ in range(heads)]
    masks = []
    for i, lab in enumerate(labels):
        lab[0, i % S] = IGNORE  # an ignored token in every head
        m = (torch.rand(B, S, generator=g) > 0.25).to(dtype)
        m[:, -1 - i:] = 0  # MTP-style rolled masks: the last i+1 tokens of every head are dropped
        masks.append(m)
    return xs, w, labels, masks


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("chunk,vchunk", [(1, None), (3, 4), (None, 5), (None, None)])
def test_values_and_grads_match_naive(depth, chunk, vchunk):
    xs, w, labels, masks = _problem(heads=1 + depth, seed=depth)
    scales = [1.0] + [0.1 / max(depth, 1)] * depth
    z = 1e-2
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    ours = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, chunk_size=chunk, z_loss_weight=z,
                                   scales=scales, vocab_chunk_size=vchunk)
    naive = _naive(xs, w, labels, masks, scales, z)
    assert len(ours) == 1 + depth
    for a, b in zip(ours, naive):
        assert a.shape == b.shape and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a loss-mask-weighted mean, as megatron's loss function does, drives the backward
    upstream = [torch.rand_like(m) * m for m in masks]
    tot_a = sum((a * u).sum() for a, u in zip(ours, upstream))
    tot_b = sum((b * u).sum() for b, u in zip(naive, upstream))
    ga = torch.autograd.grad(tot_a, [w, *xs])
    gb = torch.autograd.grad(tot_b, [w, *xs])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_gradcheck_two_heads_masked_zloss():
    xs, w, labels, masks = _problem(S=3, B=2, H=4, V=7, heads=2, seed=7)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()

    def fn(w, x0, x1):
        return tuple(fused_mtp_cross_entropy([x0, x1], w, labels, loss_masks=masks, chunk_size=4,
                                             vocab_chunk_size=3, z_loss_weight=0.05, scales=[1.0, 0.3]))

    assert torch.autograd.gradcheck(fn, (w, *xs), eps=1e-6, atol=1e-8)


def test_single_head_entry_and_unused_head():
    xs, w, labels, masks = _problem(heads=2, seed=3)
    w.requires_grad_()
    x0 = xs[0].requires_grad_()
    loss = fused_linear_cross_entropy(x0, w, labels[0], loss_mask=masks[0], chunk_size=4, scale=0.5)
    torch.testing.assert_close(loss, _naive([x0], w, labels[:1], masks[:1], [0.5])[0], rtol=1e-12, atol=1e-12)
    # only one of two heads' losses reaches the objective: the other head gets no gradient
    x1 = xs[1].requires_grad_()
    l0, l1 = fused_mtp_cross_entropy([x0, x1], w, labels, loss_masks=masks)
    gw, g0, g1 = torch.autograd.grad(l0.sum(), [w, x0, x1], allow_unused=True)
    ref = torch.autograd.grad(_naive([x0], w, labels[:1], masks[:1], [1.0])[0].sum(), [w, x0])
    torch.testing.assert_close(gw, ref[0])
    torch.testing.assert_close(g0, ref[1])
    assert g1 is None or torch.count_nonzero(g1) == 0
    assert fused_mtp_cross_entropy([], w, []) == []


def test_matches_megatron_vocab_parallel_ce_math_bf16():
    """bf16 hidden / weight: same values as megatron's unfused path (bf16 logits, fp32 softmax)."""
    ce_mod = pytest.importorskip("megatron.core.tensor_parallel.cross_entropy")
    VP = ce_mod.VocabParallelCrossEntropy
    g = torch.Generator().manual_seed(11)
    S, B, H, V = 16, 2, 32, 300
    x = torch.randn(S, B, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16()
    labels = torch.randint(0, V, (B, S), generator=g)
    # megatron's steps at TP=1 (the all-reduces are identities): [s, b, v] logits, [s, b] target
    logits = torch.matmul(x, w.t())
    lg, lmax = VP.calculate_logits_max(logits)
    _, _, pred, sumexp, exp_logits = VP.calculate_predicted_logits(lg, labels.t().contiguous(), lmax, 0, V)
    _, mloss = VP.calculate_cross_entropy_loss(exp_logits, pred, sumexp)
    ours = fused_linear_cross_entropy(x, w, labels, chunk_size=5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, mloss.t(), rtol=1e-5, atol=1e-5)


def test_chunks_bound_the_logits(monkeypatch):
    """No GEMM ever produces more than chunk_size x vocab_chunk_size logits (backward) or
    chunk_size x vocab (forward)."""
    seen = []
    real_mm = torch.mm

    def spy(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(fce.torch, "mm", spy)
    xs, w, labels, masks = _problem(S=8, B=2, H=5, V=9, heads=2)
    xs = [x.requires_grad_() for x in xs]
    losses = fused_mtp_cross_entropy(xs, w.requires_grad_(), labels, loss_masks=masks, chunk_size=3,
                                     vocab_chunk_size=4)
    n_fwd = len(seen)
    assert n_fwd == 2 * 6 and all(shape == (3, 9) or shape == (1, 9) for shape in seen)  # 16 rows / 3
    sum(l.sum() for l in losses).backward()
    tiles = seen[n_fwd:]  # recomputed [rows, vocab slice] logits (the grad GEMMs accumulate via addmm_)
    assert len(tiles) == 3 * 12 and all(r <= 3 and c <= 4 for r, c in tiles)
    assert fce.default_chunk_size(124416, torch.bfloat16, 8192) == fce.TILE_BYTES // (124416 * 2)
    assert fce.default_chunk_size(15552, torch.bfloat16, 100) == 100


@pytest.mark.parametrize("vocab,hidden,vchunk,plan", [
    (40, 16, 7, "sliced"),    # explicit vocab slices
    (40, 16, None, "single"),  # auto: one tile per head, weight grad summed over heads in bf16
    (40, 4, None, "acc"),      # auto: one fp32 [V, h] weight-grad accumulator over token chunks
    (200, 16, None, "sliced"),  # auto: fp32 hidden-grad sums over vocab slices
])
def test_bf16_tiled_backward_close_to_float64(monkeypatch, vocab, hidden, vchunk, plan):
    """bf16 through every backward plan stays at bf16 accuracy against float64."""
    monkeypatch.setattr(fce, "TILE_BYTES", 512)
    monkeypatch.setattr(fce, "_MIN_ACC_CHUNK_ROWS", 1)  # tiny shapes: let the "acc" plan compete
    seen = []
    real_plan = fce._backward_plan
    monkeypatch.setattr(fce, "_backward_plan", lambda **kw: seen.append(real_plan(**kw)) or seen[-1])
    xs, w, labels, masks = _problem(S=12, B=2, H=hidden, V=vocab, heads=2, seed=9)
    x16 = [x.bfloat16().requires_grad_() for x in xs]
    w16 = w.bfloat16().requires_grad_()
    losses = fused_mtp_cross_entropy(x16, w16, labels, loss_masks=masks, vocab_chunk_size=vchunk)
    sum((l * m).sum() for l, m in zip(losses, masks)).backward()
    xd = [x.detach().double().requires_grad_() for x in x16]
    wd = w16.detach().double().requires_grad_()
    ref = _naive(xd, wd, labels, masks, [1.0, 1.0])
    sum((l * m).sum() for l, m in zip(ref, masks)).backward()
    for a, b in zip(losses, ref):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w16.grad.double(), wd.grad, rtol=3e-2, atol=3e-2)
    for a, b in zip(x16, xd):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=3e-2, atol=3e-2)
    assert seen and seen[0][0] == plan


def test_backward_plan_at_tri21b_shapes():
    """The workspace plan per TP degree at Tri-21B shapes (hidden 5120, 8192 tokens, bf16)."""
    def plan(tp, depth):
        return fce._backward_plan(vocab=124416 // tp, hidden=5120, elem=2, longest=8192,
                                  x_rows=8192 * (1 + depth), fp32_acc=True, chunk_size=None,
                                  vocab_chunk_size=None)
    assert plan(1, 1)[0] == plan(1, 2)[0] == plan(2, 2)[0] == "sliced"
    assert plan(4, 2)[0] == plan(8, 1)[0] == plan(8, 2)[0] == "single"
    # the fp32 whole-shard accumulator is never picked with short token chunks (TP=1: 539 rows)
    assert fce._backward_plan(vocab=124416, hidden=64, elem=2, longest=8192, x_rows=8192 * 3,
                              fp32_acc=True, chunk_size=None, vocab_chunk_size=None)[0] != "acc"
    kind, vs, chunk = plan(1, 1)
    assert vs * 5120 * 4 <= fce.TILE_BYTES and vs * chunk * 2 <= fce.TILE_BYTES
    assert fce._backward_plan(vocab=9, hidden=4, elem=4, longest=10, x_rows=10, fp32_acc=False,
                              chunk_size=None, vocab_chunk_size=None)[0] == "direct"
    # into megatron's main_grad ("direct"): token chunks of 128 MiB but never under 2,048 rows, since
    # each chunk re-reads and re-writes the whole fp32 [V/tp, h] main_grad
    def direct(tp):
        return fce._backward_plan(vocab=124416 // tp, hidden=5120, elem=2, longest=8192, x_rows=8192 * 2,
                                  fp32_acc=False, chunk_size=None, vocab_chunk_size=None)
    assert direct(1) == ("direct", 124416, 2048)
    assert direct(8) == ("direct", 124416 // 8, fce.TILE_BYTES // (124416 // 8 * 2))


@pytest.mark.parametrize("with_flag", [False, True])
def test_accumulate_into_main_grad_like_megatron(with_flag):
    xs, w, labels, masks = _problem(heads=2, seed=4)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    w.main_grad = torch.full_like(w, 0.5)
    if with_flag:
        w.grad_added_to_main_grad = False
    losses = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, vocab_chunk_size=4,
                                     accumulate_into_main_grad=True)
    sum(l.sum() for l in losses).backward()
    ref_w = w.detach().clone().requires_grad_()
    sum(l.sum() for l in _naive(xs, ref_w, labels, masks, [1.0, 1.0])).backward()
    torch.testing.assert_close(w.main_grad, 0.5 + ref_w.grad, rtol=1e-12, atol=1e-12)
    if with_flag:
        assert w.grad_added_to_main_grad is True and w.grad is not None  # megatron's dummy grad
    else:
        assert w.grad is None
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0], torch.zeros(3, 6, dtype=torch.float64), labels[0] % 3,
                                   accumulate_into_main_grad=True)


def test_bad_arguments_raise():
    xs, w, labels, masks = _problem(heads=1)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0].float(), w, labels[0])  # dtype mismatch
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0], w, labels[0].t())  # labels not [b, s]
    with pytest.raises(ValueError):
        fused_mtp_cross_entropy(xs, w, labels * 2)


# ------------------------------------------------------------------------------- TP=2 under gloo -------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank, world, port, chunk):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        xs, w, labels, masks = _problem(S=6, B=2, H=5, V=14, heads=3, seed=5)  # main + MTP depth 2
        scales, z = [1.0, 0.05, 0.05], 1e-2
        vl = w.shape[0] // world
        w_shard = w[rank * vl:(rank + 1) * vl].clone().requires_grad_()
        xs_local = [x.clone().requires_grad_() for x in xs]
        ours = fused_mtp_cross_entropy(xs_local, w_shard, labels, loss_masks=masks, tp_group=group,
                                       chunk_size=chunk, z_loss_weight=z, scales=scales)
        xs_ref = [x.clone().requires_grad_() for x in xs]
        w_ref = w.clone().requires_grad_()
        naive = _naive(xs_ref, w_ref, labels, masks, scales, z)
        for a, b in zip(ours, naive):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
        upstream = [m / m.sum() for m in masks]
        sum((a * u).sum() for a, u in zip(ours, upstream)).backward()
        sum((b * u).sum() for b, u in zip(naive, upstream)).backward()
        # weight: each rank holds its shard's exact gradient
        torch.testing.assert_close(w_shard.grad, w_ref.grad[rank * vl:(rank + 1) * vl], rtol=1e-11, atol=1e-12)
        # hidden: partial per shard; the caller's all-reduce (copy_to_tensor_model_parallel_region)
        # completes it
        for x_local, x_ref in zip(xs_local, xs_ref):
            g = x_local.grad.clone()
            dist.all_reduce(g, group=group)
            torch.testing.assert_close(g, x_ref.grad, rtol=1e-11, atol=1e-12)
            assert not torch.allclose(x_local.grad, x_ref.grad)  # really a partial
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk", [4])
def test_vocab_parallel_tp2_gloo_mtp_depth2(chunk):
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(2, _free_port(), chunk), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------ GPU -------
# (kernel_device: the CUDA extension on a GPU, or the same kernel source on the CPU emulator)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [4096, 4093])  # 4093: rows not 16-byte aligned -> scalar path
def test_gpu_kernel_matches_reference(kernel_device, dtype, vocab):
    dev = kernel_device
    g = torch.Generator(device=dev).manual_seed(0)
    S, B, H = (256, 2, 256) if dev == "cuda" else (64, 2, 64)
    xs = [torch.randn(S, B, H, device=dev, generator=g).to(dtype) for _ in range(3)]
    w = (torch.randn(vocab, H, device=dev, generator=g) * 0.05).to(dtype)
    labels = [torch.randint(0, vocab, (B, S), device=dev, generator=g) for _ in range(3)]
    labels[0][0, :7] = IGNORE
    masks = [torch.ones(B, S, device=dev) for _ in range(3)]
    masks[2][:, -2:] = 0
    kw = dict(loss_masks=masks, chunk_size=200 if dev == "cuda" else 50, z_loss_weight=1e-3,
              scales=[1.0, 0.05, 0.05])
    results = []
    for fn in (fused_mtp_cross_entropy, reference_mtp_cross_entropy):
        xx = [x.clone().requires_grad_() for x in xs]
        ww = w.clone().requires_grad_()
        losses = fn(xx, ww, labels, **kw)
        sum((l * m).sum() / m.sum() for l, m in zip(losses, masks)).backward()
        results.append((losses, ww.grad, [x.grad for x in xx]))
    (kl, kw_, kx), (rl, rw, rx) = results
    # losses: fp32 softmax both ways (fast-math exp in the kernel) -> 1e-4 relative
    for a, b in zip(kl, rl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # gradients: the kernel rounds softmax - onehot to the logits dtype once, like the reference;
    # compared by relative norm (the entries are ~1e-6, so elementwise atol would say nothing)
    bound = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel_err(kw_, rw) < bound
    for a, b in zip(kx, rx):
        assert _rel_err(a, b) < bound


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gpu_fused_matches_megatron_unfused_bf16(kernel_device):
    """Against megatron's unfused formula at TP=1 (bf16 logits, fp32 softmax)."""
    dev = kernel_device
    g = torch.Generator(device=dev).manual_seed(1)
    S, B, H, V = (512, 2, 512, 32000) if dev == "cuda" else (96, 2, 64, 32000)
    x = torch.randn(S, B, H, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * 0.03).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, S), device=dev, generator=g)
    loss = fused_linear_cross_entropy(x, w, labels, chunk_size=300 if dev == "cuda" else 64)
    loss.mean().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    logits = torch.matmul(x, w.t()).float()
    ref = F.cross_entropy(logits.view(-1, V), labels.t().reshape(-1), reduction="none").view(S, B).t()
    ref.mean().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    assert _rel_err(gx, x.grad) < 1e-2
    assert _rel_err(gw, w.grad) < 1e-2
