"""RoPE + query scale (tri_megatron.ops.rope_ssmax): the reference against naive computations.

The naive oracle is megatron-core's own unfused RoPE (``_apply_rotary_pos_emb_bshd`` / ``_thd``) times
a query factor built element by element with Python's math module; gradients of the reference's
hand-written backward are checked with ``torch.autograd.gradcheck`` in double precision.
Kernel tests (kernel vs reference, bf16 / fp32) run on a GPU -- skipped only when no CUDA device is
present -- and on the CPU emulator of the same kernel source (tests/kernel_emulator.py), at 1/8 size.
"""

import math

import pytest
import torch

from tri_megatron.ops.rope_ssmax import (
    apply_rope_and_query_scale,
    document_positions,
    query_scale_factor,
    reference_rope_and_query_scale,
)

torch.set_num_threads(1)

rope_utils = pytest.importorskip("megatron.core.models.common.embeddings.rope_utils")


class _SingleRankCP:
    """Stand-in for a context-parallel group of size 1 (megatron's thd RoPE asks for one)."""

    def size(self):
        return 1

    def rank(self):
        return 0


def _freqs(n_pos, rot_dim, batch=1, base=10000.0, dtype=torch.float64, generator=None):
    """Megatron RotaryEmbedding layout: [n, 1 (or b), 1, rot_dim], the half-angles duplicated."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=dtype) / rot_dim))
    pos = torch.arange(n_pos, dtype=dtype)
    ang = torch.outer(pos, inv)
    emb = torch.cat([ang, ang], dim=-1)[:, None, None, :]
    if batch > 1:  # distinct per-sample angles (like mrope), to test the batch-indexed table
        shift = torch.rand(1, batch, 1, 1, dtype=dtype, generator=generator)
        emb = emb + shift
    return emb


def _naive_factor(pos_list, mode, heads, floor_scale=8192.0, attn_scale=0.1):
    """[len(pos_list), heads] temperature / unit factor, element by element with math."""
    rows = []
    for p in pos_list:
        if mode == "temperature":
            rows.append([math.log(math.floor((p + 1) / floor_scale) + 1) * attn_scale + 1] * heads)
        else:
            rows.append([1.0] * heads)
    return torch.tensor(rows, dtype=torch.float64)


def _naive_sbhd(q, k, freqs, mode, s=None, position_ids=None, apply_rope=True, **kw):
    S, B, H = q.shape[:3]
    qr = rope_utils._apply_rotary_pos_emb_bshd(q, freqs) if apply_rope else q
    kr = rope_utils._apply_rotary_pos_emb_bshd(k, freqs) if apply_rope else k
    per_sample = []
    for b in range(B):
        pos = [int(position_ids[b, i]) if position_ids is not None else i for i in range(S)]
        if mode == "ssmax":  # built from s with torch ops so gradients to s can be compared
            per_sample.append(torch.log(torch.tensor(pos, dtype=torch.float64) + 1)[:, None] * s[None, :])
        else:
            per_sample.append(_naive_factor(pos, mode, H, **kw))
    fac = torch.stack(per_sample, dim=1)[..., None]  # [S, B, H, 1]
    return qr * fac, kr


def _naive_thd(q, k, cu, freqs, mode, s=None, **kw):
    qr = rope_utils._apply_rotary_pos_emb_thd(q, cu, freqs, cp_group=_SingleRankCP())
    kr = rope_utils._apply_rotary_pos_emb_thd(k, cu, freqs, cp_group=_SingleRankCP())
    pos = []
    for d in range(len(cu) - 1):
        pos += list(range(int(cu[d + 1] - cu[d])))
    if mode == "ssmax":
        fac = torch.log(torch.tensor(pos, dtype=torch.float64) + 1)[:, None] * s[None, :]
    else:
        fac = _naive_factor(pos, mode, q.shape[1], **kw)
    return qr * fac[:, :, None], kr


def _rand(*shape, gen, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)


@pytest.mark.parametrize("mode", ["none", "ssmax", "temperature"])
@pytest.mark.parametrize("rot_dim", [8, 6])  # 6 < head dim 8: megatron's rotary_percent pass-through
def test_sbhd_matches_megatron_values_and_grads(mode, rot_dim):
    g = torch.Generator().manual_seed(0)
    S, B, Hq, Hk, D = 7, 2, 4, 2, 8
    q, k = _rand(S, B, Hq, D, gen=g), _rand(S, B, Hk, D, gen=g)
    s = (torch.rand(Hq, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    freqs = _freqs(S, rot_dim)
    kw = dict(floor_scale=3.0, attn_scale=0.7)  # small floor_scale so the floor steps inside S
    qo, ko = apply_rope_and_query_scale(q, k, freqs, mode=mode, ssmax_scale=s, **kw)
    qn, kn = _naive_sbhd(q, k, freqs, mode, s=s, **kw)
    torch.testing.assert_close(qo, qn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, kn, rtol=1e-12, atol=1e-12)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ours = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k, s), allow_unused=True)
    naive = torch.autograd.grad((qn * gq).sum() + (kn * gk).sum(), (q, k, s), allow_unused=True)
    for a, b in zip(ours, naive):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mode", ["none", "ssmax", "temperature"])
def test_gradcheck_sbhd_with_batched_freqs(mode):
    g = torch.Generator().manual_seed(1)
    S, B, Hq, Hk, D = 5, 2, 2, 1, 6
    q, k = _rand(S, B, Hq, D, gen=g), _rand(S, B, Hk, D, gen=g)
    s = (torch.rand(Hq, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    # longer than S, per-sample rows, rot_dim 4 < 6, and angles not duplicated across the two halves
    # (megatron's always are; the kernel's transpose must not rely on it)
    freqs = torch.rand(S + 3, B, 1, 4, dtype=torch.float64, generator=g) * 6

    def fn(q, k, s):
        return apply_rope_and_query_scale(q, k, freqs, mode=mode, ssmax_scale=s, floor_scale=2.0)

    assert torch.autograd.gradcheck(fn, (q, k, s), eps=1e-6, atol=1e-8)
    # the batch-indexed table is really used: sample b takes freqs[:, b]
    qo, ko = fn(q, k, s)
    kn = torch.stack([rope_utils._apply_rotary_pos_emb_bshd(k[:, b:b + 1], freqs[:S, b:b + 1])[:, 0]
                      for b in range(B)], dim=1)
    torch.testing.assert_close(ko, kn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["none", "ssmax", "temperature"])
def test_thd_packed_documents_match_megatron(mode):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 3, 4, 9, 11], dtype=torch.int32)  # four documents, one of length 1
    T, Hq, Hk, D = 11, 3, 1, 8
    q, k = _rand(T, Hq, D, gen=g), _rand(T, Hk, D, gen=g)
    s = (torch.rand(Hq, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    freqs = _freqs(5, D)  # max document length
    kw = dict(floor_scale=2.0, attn_scale=0.3)
    qo, ko = apply_rope_and_query_scale(q, k, freqs, mode=mode, ssmax_scale=s, cu_seqlens=cu, **kw)
    qn, kn = _naive_thd(q, k, cu, freqs, mode, s=s, **kw)
    torch.testing.assert_close(qo, qn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, kn, rtol=1e-12, atol=1e-12)
    # positions restart per document: the first token of every document has log(n) = 0 under SSMax
    if mode == "ssmax":
        assert torch.count_nonzero(qo[cu[:-1].long()]) == 0

    def fn(q, k, s):
        return apply_rope_and_query_scale(q, k, freqs, mode=mode, ssmax_scale=s, cu_seqlens=cu, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, s), eps=1e-6, atol=1e-8)


def test_nope_layer_scales_q_only_and_leaves_k_untouched():
    g = torch.Generator().manual_seed(3)
    S, B, H, D = 6, 1, 2, 4
    q, k = _rand(S, B, H, D, gen=g), _rand(S, B, H, D, gen=g)
    qo, ko = apply_rope_and_query_scale(q, k, None, apply_rope=False, mode="temperature",
                                        floor_scale=2.0, attn_scale=0.5)
    assert ko is k
    fac = _naive_factor(range(S), "temperature", H, floor_scale=2.0, attn_scale=0.5)
    torch.testing.assert_close(qo, q * fac[:, None, :, None], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q: apply_rope_and_query_scale(q, None, None, apply_rope=False, mode="temperature",
                                             floor_scale=2.0)[0], (q,))
    # no RoPE and no scale: identity, same objects
    a, b = apply_rope_and_query_scale(q, k, None, apply_rope=False, mode="none")
    assert a is q and b is k


def test_position_ids_drive_the_factor_not_the_angles():
    g = torch.Generator().manual_seed(4)
    S, B, H, D = 6, 2, 2, 4
    q, k = _rand(S, B, H, D, gen=g), _rand(S, B, H, D, gen=g)
    s = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    pid = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])  # sample 0 holds two documents
    freqs = _freqs(S, D)
    qo, ko = apply_rope_and_query_scale(q, k, freqs, mode="ssmax", ssmax_scale=s, position_ids=pid)
    qn, kn = _naive_sbhd(q, k, freqs, "ssmax", s=s, position_ids=pid)
    torch.testing.assert_close(qo, qn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, kn, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, s: apply_rope_and_query_scale(q, None, freqs, mode="ssmax", ssmax_scale=s,
                                                position_ids=pid)[0], (q, s))


def test_query_scale_factor_helper_and_document_positions():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert document_positions(cu).tolist() == [0, 1, 0, 1, 2]
    pos = torch.arange(10)
    t = query_scale_factor(pos, "temperature", floor_scale=4.0, attn_scale=0.1)
    expect = [math.log(math.floor((p + 1) / 4.0) + 1) * 0.1 + 1 for p in range(10)]
    torch.testing.assert_close(t[:, 0], torch.tensor(expect, dtype=torch.float32))
    assert t[2, 0] == 1.0 and t[3, 0] > 1.0  # exact step at pos + 1 = floor_scale
    s = torch.tensor([1.0, 3.0])
    f = query_scale_factor(pos, "ssmax", ssmax_scale=s)
    torch.testing.assert_close(f, torch.log1p(pos.float())[:, None] * s)
    assert query_scale_factor(pos, "none") is None


def test_bf16_io_fp32_math():
    g = torch.Generator().manual_seed(5)
    S, B, H, D = 16, 2, 4, 16
    q = torch.randn(S, B, H, D, generator=g)
    k = torch.randn(S, B, 2, D, generator=g)
    s = torch.rand(H, generator=g) + 0.5
    freqs = _freqs(S, D, dtype=torch.float32)
    q16, k16 = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    s16 = s.bfloat16().requires_grad_()
    qo, ko = apply_rope_and_query_scale(q16, k16, freqs, mode="ssmax", ssmax_scale=s16)
    assert qo.dtype == ko.dtype == torch.bfloat16
    qr, kr = apply_rope_and_query_scale(q16.float(), k16.float(), freqs, mode="ssmax",
                                        ssmax_scale=s16.float())
    torch.testing.assert_close(qo.float(), qr, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ko.float(), kr, rtol=1e-2, atol=1e-2)
    (qo.float().sum() + ko.float().sum()).backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()


def test_bad_arguments_raise():
    q = torch.randn(4, 1, 2, 4)
    with pytest.raises(ValueError):
        apply_rope_and_query_scale(q, None, None, mode="ssmax")  # no ssmax_scale
    with pytest.raises(ValueError):
        apply_rope_and_query_scale(q, None, _freqs(4, 4), mode="bogus")
    with pytest.raises(ValueError):
        apply_rope_and_query_scale(q, None, _freqs(2, 4))  # freqs shorter than the sequence
    with pytest.raises(ValueError):  # cu_seqlens not covering the packed tokens
        apply_rope_and_query_scale(q[:, 0], None, _freqs(4, 4), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))


# ------------------------------------------------------------------------------------------ GPU -------
# (kernel_device: the CUDA extension on a GPU, or the same kernel source on the CPU emulator)
def _gpu_case(dev, dtype, thd, mode, rot_dim=128, D=128):
    n = 1 if dev == "cuda" else 8  # the emulator runs at 1/8 of the tokens
    g = torch.Generator(device=dev).manual_seed(0)
    if thd:
        cu = torch.tensor([0, 700 // n, 700 // n + 1, 1500 // n, 2048 // n], dtype=torch.int32, device=dev)
        q = torch.randn(2048 // n, 8, D, device=dev, generator=g, dtype=dtype)
        k = torch.randn(2048 // n, 2, D, device=dev, generator=g, dtype=dtype)
        freqs = _freqs(1024 // n, rot_dim, dtype=torch.float32).to(dev)
    else:
        cu = None
        q = torch.randn(512 // n, 3, 8, D, device=dev, generator=g, dtype=dtype)
        k = torch.randn(512 // n, 3, 2, D, device=dev, generator=g, dtype=dtype)
        freqs = _freqs(512 // n, rot_dim, dtype=torch.float32).to(dev)
    s = (torch.rand(8, device=dev, generator=g) + 0.5)
    kw = dict(mode=mode, floor_scale=64.0, attn_scale=0.1, cu_seqlens=cu)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    out = []
    for fn in (apply_rope_and_query_scale, reference_rope_and_query_scale):
        qq, kk, ss = (t.detach().clone().requires_grad_() for t in (q, k, s))
        qo, ko = fn(qq, kk, freqs, ssmax_scale=ss, **kw)
        torch.autograd.backward((qo, ko), (gq, gk))
        out.append((qo, ko, qq.grad, kk.grad, ss.grad if mode == "ssmax" else None))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("thd", [False, True])
@pytest.mark.parametrize("mode", ["none", "ssmax", "temperature"])
def test_gpu_kernel_matches_reference(kernel_device, dtype, thd, mode):
    # fp32: same math, fast-math intrinsics only in log -> 1e-5; bf16: one rounding each side -> 1 ulp
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    (kq, kk, kgq, kgk, kds), (rq, rk, rgq, rgk, rds) = _gpu_case(kernel_device, dtype, thd, mode)
    for a, b in ((kq, rq), (kk, rk), (kgq, rgq), (kgk, rgk)):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if mode == "ssmax":
        torch.testing.assert_close(kds, rds, rtol=1e-3, atol=1e-3)


def test_gpu_partial_rotary_and_nope(kernel_device):
    (kq, kk, kgq, kgk, _), (rq, rk, rgq, rgk, _) = _gpu_case(kernel_device, torch.float32, False, "ssmax",
                                                             rot_dim=64)
    torch.testing.assert_close(kq, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kgq, rgq, rtol=1e-5, atol=1e-5)
    q = torch.randn(300, 2, 4, 64, device=kernel_device)
    a, _ = apply_rope_and_query_scale(q, None, None, apply_rope=False, mode="temperature", floor_scale=16.0)
    b, _ = reference_rope_and_query_scale(q, None, None, apply_rope=False, mode="temperature", floor_scale=16.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
