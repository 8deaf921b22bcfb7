"""Fused linear + softmax cross-entropy (tri_megatron.ops.fused_cross_entropy) against naive oracles.

Oracles: full logits + ``torch.nn.functional.cross_entropy`` in float64 (values and autograd
gradients), megatron-core's own vocab-parallel CE math (``VocabParallelCrossEntropy``'s steps) at
TP=1 on bf16 logits, ``gradcheck`` of the hand-written backward, and a real TP=2 run under gloo whose
losses and (all-reduced / gathered) gradients must equal the single-process full-vocab computation.
Kernel tests (kernel vs reference) run on a GPU -- skipped only when no CUDA device is present --
and on the CPU emulator of the same kernel source (tests/kernel_emulator.py), at smaller sizes.
Gradients are computed in the op's forward: tests check every backward path (megatron's upstream with
a loss scale != 1: rescaled; any other upstream: weight gradient recomputed; into main_grad: added in
the forward with the factor last seen, corrected in backward when it differs), the GEMM count per
chunk, no gradient work without grad mode, accumulation over micro-batches into main_grad with a
changing factor, a second backward, and activation recompute applying the gradients once.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from tri_megatron.local_dist import free_port
from tri_megatron.ops import ce_chunks
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


def _megatron_upstream(masks, scales, c):
    """The upstream megatron's schedule sends each head's per-token loss: main head mask / num_tokens,
    MTP head k mask * its scale (here folded into the op's ``scales``) / its token count -- times one
    common factor c (loss scale / micro-batches). Returns (upstream tensors, upstream_weights)."""
    weights = [1.0 / m.sum() for m in masks]
    return [c * w * m for w, m in zip(weights, masks)], weights


def _grads(losses, upstream, inputs):
    return torch.autograd.grad(sum((l * u).sum() for l, u in zip(losses, upstream)), inputs)


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("upstream_kind", ["megatron", "arbitrary"])
def test_values_and_grads_match_naive(depth, chunk, upstream_kind):
    """Values and gradients equal the full-logits float64 computation, for megatron's upstream with a
    loss scale != 1 (gradients from the forward, rescaled) and for an arbitrary one (recomputed)."""
    xs, w, labels, masks = _problem(heads=1 + depth, seed=depth)
    masks[0][1, 1] = 0.5  # a fractional loss-mask weight
    scales = [1.0] + [0.1 / max(depth, 1)] * depth
    z = 1e-2
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    if upstream_kind == "megatron":
        upstream, weights = _megatron_upstream(masks, scales, c=1024.0 / 3)
    else:
        g = torch.Generator().manual_seed(42)
        upstream, weights = [torch.rand(m.shape, generator=g, dtype=m.dtype) * m for m in masks], None
    before = dict(fce.backward_path_counts)
    ours = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, chunk_size=chunk, z_loss_weight=z,
                                   scales=scales, upstream_weights=weights)
    naive = _naive(xs, w, labels, masks, scales, z)
    assert len(ours) == 1 + depth
    for a, b in zip(ours, naive):
        assert a.shape == b.shape and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga = _grads(ours, upstream, [w, *xs])
    gb = _grads(naive, upstream, [w, *xs])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    path = "stored" if upstream_kind == "megatron" else "recomputed"
    assert fce.backward_path_counts[path] == before[path] + 1


def test_gradcheck_two_heads_masked_zloss():
    xs, w, labels, masks = _problem(S=3, B=2, H=4, V=7, heads=2, seed=7)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()

    def fn(w, x0, x1):
        return tuple(fused_mtp_cross_entropy([x0, x1], w, labels, loss_masks=masks, chunk_size=4,
                                             z_loss_weight=0.05, scales=[1.0, 0.3]))

    assert torch.autograd.gradcheck(fn, (w, *xs), eps=1e-6, atol=1e-8)


def test_fp32_extreme_logits_match_float64():
    """fp32 logits spanning thousands: target probabilities far below fp32's smallest number (losses of
    hundreds of nats) and rows dominated by one token. The CPU path reads lse back from the in-place
    softmax (the row max of the softmax, never below 1/V), so it must stay exact there."""
    g = torch.Generator().manual_seed(11)
    S, B, H, V = 8, 2, 16, 50
    x = (torch.randn(S, B, H, generator=g, dtype=torch.float64) * 40).float().requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=torch.float64).float().requires_grad_()
    lab = torch.randint(0, V, (B, S), generator=g)
    loss = fused_linear_cross_entropy(x, w, lab, chunk_size=5)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _naive([xd], wd, [lab], [None], [1.0])[0]
    assert ref.max() > 200  # some target probabilities underflow fp32 (exp(-104) is its smallest)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-3)
    loss.sum().backward()
    ref.sum().backward()
    assert _rel_err(w.grad, wd.grad) < 1e-5 and _rel_err(x.grad, xd.grad) < 1e-5  # the issue-14 bound


def test_single_head_entry_and_unused_head():
    xs, w, labels, masks = _problem(heads=2, seed=3)
    w.requires_grad_()
    x0 = xs[0].requires_grad_()
    loss = fused_linear_cross_entropy(x0, w, labels[0], loss_mask=masks[0], chunk_size=4, scale=0.5)
    torch.testing.assert_close(loss, _naive([x0], w, labels[:1], masks[:1], [0.5])[0], rtol=1e-12, atol=1e-12)
    # only one of two heads' losses reaches the objective: the other head gets no gradient (and the
    # weight gradient, stored for both heads, is recomputed for the used one)
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


class _GemmCounter:
    """Counts the op's GEMMs: torch.mm (logits, hidden grad) and the weight-grad accumulation."""

    def __init__(self, monkeypatch):
        self.mm, self.acc = [], 0
        real_mm, real_acc = torch.mm, ce_chunks.accumulate_mm

        def mm(a, b, *args, **kwargs):
            out = real_mm(a, b, *args, **kwargs)
            self.mm.append(tuple(out.shape))
            return out

        def acc(*args):
            self.acc += 1
            return real_acc(*args)

        monkeypatch.setattr(fce.torch, "mm", mm)
        monkeypatch.setattr(ce_chunks, "accumulate_mm", acc)

    def take(self):
        out = (list(self.mm), self.acc)
        self.mm.clear()
        self.acc = 0
        return out


def test_three_gemms_per_chunk_in_forward_none_in_backward(monkeypatch):
    """Training: per chunk the logits, hidden-grad and weight-grad GEMMs run in the forward, and the
    backward runs none; no GEMM produces more than chunk_size x vocab logits."""
    count = _GemmCounter(monkeypatch)
    xs, w, labels, masks = _problem(S=8, B=2, H=5, V=9, heads=2)
    xs = [x.requires_grad_() for x in xs]
    upstream, weights = _megatron_upstream(masks, [1.0, 1.0], c=8.0)
    losses = fused_mtp_cross_entropy(xs, w.requires_grad_(), labels, loss_masks=masks, chunk_size=3,
                                     upstream_weights=weights)
    mms, accs = count.take()
    chunks = 2 * 6  # 16 rows per head / 3
    # the first weight-grad GEMM writes the accumulator, the others add into it
    assert len(mms) + accs == 3 * chunks and mms.count((9, 5)) == 1 and accs == chunks - 1
    assert all(shape in ((3, 9), (1, 9), (3, 5), (1, 5), (9, 5)) for shape in mms)
    sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
    assert count.take() == ([], 0)
    assert fce.default_chunk_size(124416, torch.bfloat16, 8192) == ce_chunks.TILE_BYTES // (124416 * 2)
    assert fce.default_chunk_size(124416, torch.bfloat16, 8192, grads=True) == 2048  # GPU
    assert fce.default_chunk_size(124416, torch.bfloat16, 8192, grads=True, device="cpu") == 269
    assert fce.default_chunk_size(15552, torch.bfloat16, 100) == 100


@pytest.mark.parametrize("how", ["no_grad", "inputs_without_grad"])
def test_forward_only_computes_no_gradients(monkeypatch, how):
    """Evaluation (no grad mode, or nothing requiring grad): only the logits GEMM per chunk, and the
    same losses."""
    count = _GemmCounter(monkeypatch)
    xs, w, labels, masks = _problem(S=8, B=2, H=5, V=9, heads=2)
    if how == "no_grad":
        xs = [x.requires_grad_() for x in xs]
        w.requires_grad_()
        with torch.no_grad():
            losses = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, chunk_size=3)
    else:
        losses = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, chunk_size=3)
    mms, accs = count.take()
    assert len(mms) == 12 and accs == 0 and all(shape[1] == 9 for shape in mms)
    assert all(l.grad_fn is None for l in losses)
    for a, b in zip(losses, _naive(xs, w.detach(), labels, masks, [1.0, 1.0])):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("into_main_grad", [False, True])
def test_low_precision_close_to_float64(dtype, into_main_grad):
    """fp32 / bf16 against float64, the weight gradient as a plain .grad and into an fp32 main_grad."""
    xs, w, labels, masks = _problem(S=12, B=2, H=16, V=40, heads=2, seed=9)
    xl = [x.to(dtype).requires_grad_() for x in xs]
    wl = w.to(dtype).requires_grad_()
    if into_main_grad:
        wl.main_grad = torch.zeros(wl.shape, dtype=torch.float32)
    upstream, weights = _megatron_upstream(masks, [1.0, 1.0], c=2.0 ** 12)
    losses = fused_mtp_cross_entropy(xl, wl, labels, loss_masks=masks, chunk_size=7, upstream_weights=weights,
                                     accumulate_into_main_grad=into_main_grad)
    sum((l * u.to(l.dtype)).sum() for l, u in zip(losses, upstream)).backward()
    xd = [x.detach().double().requires_grad_() for x in xl]
    wd = wl.detach().double().requires_grad_()
    ref = _naive(xd, wd, labels, masks, [1.0, 1.0])
    sum((l * u).sum() for l, u in zip(ref, upstream)).backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(losses, ref):
        torch.testing.assert_close(a.double(), b.detach(), **tol)
    gw = wl.main_grad if into_main_grad else wl.grad
    assert _rel_err(gw, wd.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    for a, b in zip(xl, xd):
        assert _rel_err(a.grad, b.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("with_flag", [False, True])
def test_accumulate_into_main_grad_like_megatron(with_flag):
    """Gradient accumulation over 5 micro-batches into main_grad with a loss scale != 1 that changes once
    (as with a batch-size rampup): the weight gradient goes into main_grad in the forward with the factor
    last seen, nothing weight-sized is held for the backward, and the backward corrects main_grad when
    the factor differs. After every micro-batch main_grad is exactly the sum of c * its gradients."""
    w = _problem(heads=2, seed=4)[1].requires_grad_()
    w.main_grad = torch.full_like(w, 0.5)
    if with_flag:
        w.grad_added_to_main_grad = False
    ref_w = w.detach().clone().requires_grad_()
    paths = []
    for mb, c in enumerate([512.0 / 4] * 3 + [512.0 / 8] * 2):
        xs, _, labels, masks = _problem(heads=2, seed=10 + mb)
        xs = [x.requires_grad_() for x in xs]
        upstream, weights = _megatron_upstream(masks, [1.0, 0.3], c=c)
        before = w.main_grad.clone()
        counts = dict(fce.backward_path_counts)
        losses = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, chunk_size=4, scales=[1.0, 0.3],
                                         upstream_weights=weights, accumulate_into_main_grad=True)
        assert not torch.equal(w.main_grad, before)  # added in the forward
        assert losses[0].grad_fn.grad_w is None  # no weight gradient held for the backward
        sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
        sum((l * u).sum() for l, u in zip(_naive(xs, ref_w, labels, masks, [1.0, 0.3]), upstream)).backward()
        paths.append(next(k for k in counts if fce.backward_path_counts[k] > counts[k]))
        torch.testing.assert_close(w.main_grad, 0.5 + ref_w.grad, rtol=1e-12, atol=1e-12)
        if with_flag:
            assert w.grad_added_to_main_grad is True and w.grad is not None  # megatron's dummy grad
            assert w.grad.shape == w.shape and w.grad.dtype == w.dtype
            w.grad, w.grad_added_to_main_grad = None, False
        else:
            assert w.grad is None
    # the first guess (1) and the changed factor are corrected; the learned factor needs nothing more
    assert paths == ["corrected", "stored", "stored", "corrected", "stored"]
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0], torch.zeros(3, 6, dtype=torch.float64), labels[0] % 3,
                                   accumulate_into_main_grad=True)


def test_bf16_correction_is_as_precise_as_the_learned_factor():
    """bf16 into an fp32 main_grad with megatron's upstream (c = 1/3): the first micro-batch (guess 1,
    corrected in backward) and a later one (factor learned) are equally close to float64 -- the
    correction recomputes the forward's tiles and scales the fp32 product, so no extra bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 512, 64, 1000
    x = torch.randn(n, 1, h, generator=g).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.05).bfloat16()
    lab = torch.randint(0, v, (1, n), generator=g)
    mask = (torch.rand(1, n, generator=g) > 0.1).float()
    wk, c = 1.0 / mask.sum(), 1.0 / 3
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(xd[:, 0] @ wd.t(), lab[0], reduction="none")
    (ref * mask[0].double() * wk * c).sum().backward()
    errors = []
    wl = w.clone().requires_grad_()
    for _ in range(2):
        wl.main_grad = torch.zeros(v, h)
        before = dict(fce.backward_path_counts)
        loss = fused_mtp_cross_entropy([x.clone().requires_grad_()], wl, [lab], loss_masks=[mask],
                                       upstream_weights=[wk], accumulate_into_main_grad=True)[0]
        (loss * mask * wk * c).sum().backward()
        errors.append((next(k for k in before if fce.backward_path_counts[k] > before[k]), _rel_err(wl.main_grad, wd.grad)))
    (first, e1), (second, e2) = errors
    assert (first, second) == ("corrected", "stored")
    assert e1 < 5e-3 and e2 < 5e-3 and e1 <= 1.25 * e2, errors


def test_into_main_grad_any_upstream_and_retain_graph():
    """Into main_grad, an upstream not of megatron's form (one head unused, random per-token weights) is
    still exact (main_grad corrected by the difference), and a second backward through the same graph
    adds the gradient a second time."""
    xs, w, labels, masks = _problem(heads=2, seed=21)
    w.requires_grad_()
    w.main_grad = torch.zeros_like(w)
    xs = [x.requires_grad_() for x in xs]
    g = torch.Generator().manual_seed(3)
    u0 = torch.rand(masks[0].shape, generator=g, dtype=masks[0].dtype)
    l0, _ = fused_mtp_cross_entropy(xs, w, labels, loss_masks=masks, accumulate_into_main_grad=True, chunk_size=3)
    (l0 * u0).sum().backward(retain_graph=True)
    ref_w = w.detach().clone().requires_grad_()
    ref_x = xs[0].detach().clone().requires_grad_()
    ref = _naive([ref_x], ref_w, labels[:1], masks[:1], [1.0])[0]
    (ref * u0).sum().backward()
    torch.testing.assert_close(w.main_grad, ref_w.grad, rtol=1e-12, atol=1e-12)
    gx = xs[0].grad.clone()
    torch.testing.assert_close(gx, ref_x.grad, rtol=1e-12, atol=1e-12)
    (l0 * u0).sum().backward()  # second backward: recomputed, added again
    torch.testing.assert_close(w.main_grad, 2 * ref_w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs[0].grad, 2 * gx, rtol=1e-12, atol=1e-12)
    assert xs[1].grad is None or not xs[1].grad.any()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_recompute_applies_gradients_once(use_reentrant):
    """Under torch.utils.checkpoint the forward runs twice (reentrant: first without grad mode); the
    weight gradient still reaches main_grad exactly once."""
    from torch.utils.checkpoint import checkpoint

    xs, w, labels, masks = _problem(heads=2, seed=6)
    w.requires_grad_()
    w.main_grad = torch.zeros_like(w)
    w.grad_added_to_main_grad = False
    inp = [x.clone().requires_grad_() for x in xs]
    upstream, weights = _megatron_upstream(masks, [1.0, 1.0], c=3.0)

    def block(x0, x1):
        h0, h1 = torch.tanh(x0), torch.tanh(x1)  # something before the loss, as a recomputed layer
        return tuple(fused_mtp_cross_entropy([h0, h1], w, labels, loss_masks=masks, upstream_weights=weights,
                                             accumulate_into_main_grad=True, chunk_size=5))

    losses = checkpoint(block, *inp, use_reentrant=use_reentrant)
    sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
    ref_w = w.detach().clone().requires_grad_()
    ref_in = [x.clone().requires_grad_() for x in xs]
    ref = _naive([torch.tanh(x) for x in ref_in], ref_w, labels, masks, [1.0, 1.0])
    sum((l * u).sum() for l, u in zip(ref, upstream)).backward()
    torch.testing.assert_close(w.main_grad, ref_w.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(inp, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise():
    xs, w, labels, masks = _problem(heads=1)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0].float(), w, labels[0])  # dtype mismatch
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(xs[0], w, labels[0].t())  # labels not [b, s]
    with pytest.raises(ValueError):
        fused_mtp_cross_entropy(xs, w, labels * 2)
    with pytest.raises(ValueError):
        fused_mtp_cross_entropy(xs, w, labels, upstream_weights=[1.0, 2.0])


# ------------------------------------------------------------------------------- TP=2 under gloo -------
def _tp_worker(rank, world, port, chunk, upstream_kind):
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
        w_shard.main_grad = torch.zeros_like(w_shard)
        xs_local = [x.clone().requires_grad_() for x in xs]
        if upstream_kind == "megatron":
            upstream, weights = _megatron_upstream(masks, scales, c=64.0)
        else:
            upstream, weights = [m * (1 + torch.arange(m.numel(), dtype=m.dtype).view_as(m)) for m in masks], None
        xs_ref = [x.clone().requires_grad_() for x in xs]
        w_ref = w.clone().requires_grad_()
        paths = []
        for _ in range(2):  # two micro-batches into main_grad: the factor is learned from the first
            before = dict(fce.backward_path_counts)
            ours = fused_mtp_cross_entropy(xs_local, w_shard, labels, loss_masks=masks, tp_group=group,
                                           chunk_size=chunk, z_loss_weight=z, scales=scales,
                                           upstream_weights=weights, accumulate_into_main_grad=True)
            naive = _naive(xs_ref, w_ref, labels, masks, scales, z)
            for a, b in zip(ours, naive):
                torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
            sum((a * u).sum() for a, u in zip(ours, upstream)).backward()
            sum((b * u).sum() for b, u in zip(naive, upstream)).backward()
            paths.append(next(k for k in before if fce.backward_path_counts[k] > before[k]))
        assert paths == (["corrected", "stored"] if upstream_kind == "megatron" else ["corrected"] * 2)
        # weight: each rank holds its shard's exact gradient (the softmax normaliser is the global one)
        torch.testing.assert_close(w_shard.main_grad, w_ref.grad[rank * vl:(rank + 1) * vl], rtol=1e-11,
                                   atol=1e-12)
        # hidden: partial per shard; the caller's all-reduce (copy_to_tensor_model_parallel_region)
        # completes it
        for x_local, x_ref in zip(xs_local, xs_ref):
            g = x_local.grad.clone()
            dist.all_reduce(g, group=group)
            torch.testing.assert_close(g, x_ref.grad, rtol=1e-11, atol=1e-12)
            assert not torch.allclose(x_local.grad, x_ref.grad)  # really a partial
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk,upstream_kind", [(4, "megatron"), (5, "arbitrary")])
def test_vocab_parallel_tp2_gloo_mtp_depth2(chunk, upstream_kind):
    """TP=2 (per-chunk statistics merged over the shards before the in-forward gradients), main + 2 MTP
    heads, z-loss, masks and ignored labels, a loss scale, into main_grad."""
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(2, free_port(), chunk, upstream_kind), nprocs=2, join=True)


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
              scales=[1.0, 0.05, 0.05], upstream_weights=[1.0 / m.sum() for m in masks])
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


@pytest.mark.parametrize("into_main_grad", [False, True], ids=["grad", "main_grad"])
def test_gpu_fused_matches_megatron_unfused_bf16(kernel_device, into_main_grad):
    """Against megatron's unfused formula at TP=1 (bf16 logits, fp32 softmax). main_grad: two micro-batches
    into an fp32 main_grad as under megatron DDP (the first corrects the factor the op guessed, the second
    uses the one it learned; on CUDA through addmm into fp32 with alpha): twice the reference gradient."""
    dev = kernel_device
    g = torch.Generator(device=dev).manual_seed(1)
    S, B, H, V = (512, 2, 512, 32000) if dev == "cuda" else (96, 2, 64, 32000)
    x = torch.randn(S, B, H, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * 0.03).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, S), device=dev, generator=g)
    steps = 2 if into_main_grad else 1
    if into_main_grad:
        w.main_grad = torch.zeros(V, H, device=dev)
        w.grad_added_to_main_grad = False
    paths = []
    for _ in range(steps):
        before = dict(fce.backward_path_counts)
        loss = fused_linear_cross_entropy(x, w, labels, chunk_size=300 if dev == "cuda" else 64,
                                          accumulate_into_main_grad=into_main_grad)
        loss.mean().backward()
        paths.append(next(k for k in before if fce.backward_path_counts[k] > before[k]))
        if into_main_grad:  # what megatron DDP's hook does with the placeholder
            w.grad, w.grad_added_to_main_grad = None, False
    gx = x.grad / steps
    gw = w.main_grad / steps if into_main_grad else w.grad.clone()
    x.grad = w.grad = None
    logits = torch.matmul(x, w.t()).float()
    ref = F.cross_entropy(logits.view(-1, V), labels.t().reshape(-1), reduction="none").view(S, B).t()
    ref.mean().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    assert paths == (["corrected", "stored"] if into_main_grad else ["stored"])
    assert _rel_err(gx, x.grad) < 1e-2
    assert _rel_err(gw, w.grad) < 1e-2
