"""The CUDA dispatch branch of the ops, exercised on CPU against a software stand-in for the extension.

``FakeKernels`` implements the three bound functions of ``tri_megatron._cuda_kernels`` with the same
contract as csrc/kernels/bindings.cpp + the launchers (argument order, caller-allocated outputs, 4-D
``[S, B, H, D]`` views with unit inner stride, int32 cu_seqlens / positions, fp32 statistics, the
row = s * B + b order, the document binary search, NaN for rows past the RoPE tables) and checks the
same preconditions. Routing the ops through it checks the Python glue of the kernel path -- what is
allocated, sliced, saved and passed -- without a GPU; the math itself is checked against the
reference path, and on a GPU the real kernels are checked by the GPU tests. Every test also runs with
``EmulatedKernels`` (tests/kernel_emulator.py): the real CUDA source of csrc/kernels built for a CPU
emulator of the CUDA subset it uses, so the kernels' own indexing, reductions and rounding are
checked against the references on machines without a GPU too.
"""

import math

import pytest
import torch

from kernel_emulator import EmulatedKernels
from tri_megatron.ops import ce_chunks, ce_heads
from tri_megatron.ops import fused_cross_entropy as fce
from tri_megatron.ops import rope_ssmax as rs

torch.set_num_threads(1)


class FakeKernels:
    """Software twin of the extension's bound functions (CPU tensors, fp32 math)."""

    def __init__(self):
        self.calls = []

    # -------------------------------------------------------------- cross-entropy
    @staticmethod
    def _check_rows(logits, **vectors):
        assert logits.dim() == 2 and logits.stride(1) == 1
        for name, (t, dtype) in vectors.items():
            assert t.dtype == dtype and t.is_contiguous() and t.numel() == logits.shape[0], name

    def ce_forward_stats(self, logits, labels, vocab_start, row_max, row_sumexp, target_logit):
        self.calls.append("ce_forward_stats")
        f32 = torch.float32
        self._check_rows(logits, labels=(labels, torch.long), row_max=(row_max, f32),
                         row_sumexp=(row_sumexp, f32), target=(target_logit, f32))
        x = logits.float()
        m = x.amax(-1)
        row_max.copy_(m)
        row_sumexp.copy_(torch.exp(x - m[:, None]).sum(-1))
        t = labels - vocab_start
        inside = (t >= 0) & (t < x.shape[1])
        target_logit.copy_(torch.where(inside, x.gather(1, t.clamp(0, x.shape[1] - 1)[:, None])[:, 0], 0.0))

    def ce_backward_inplace(self, logits, labels, vocab_start, lse, p_coef, t_coef):
        self.calls.append("ce_backward_inplace")
        f32 = torch.float32
        self._check_rows(logits, labels=(labels, torch.long), lse=(lse, f32), p_coef=(p_coef, f32),
                         t_coef=(t_coef, f32))
        v = torch.arange(logits.shape[1])
        g = p_coef[:, None] * torch.exp(logits.float() - lse[:, None])
        g = g - torch.where(v[None, :] == (labels - vocab_start)[:, None], t_coef[:, None], 0.0)
        logits.copy_(g)

    # -------------------------------------------------------------- RoPE + query scale
    def rope_query_scale(self, q_in, q_out, k_in, k_out, cos, sin, freq_batch, cu_seqlens, positions,
                         ssmax_scale, q_saved, ds_partial, mode, rotate, inverse, floor_scale, attn_scale):
        self.calls.append(("rope_query_scale", inverse))
        assert (q_in is None) == (q_out is None) and (k_in is None) == (k_out is None)
        like = q_in if q_in is not None else k_in
        for t in (q_in, q_out, k_in, k_out, q_saved):
            if t is not None:
                assert t.dim() == 4 and t.stride(3) == 1 and t.dtype == like.dtype
                assert t.shape[0] == like.shape[0] and t.shape[1] == like.shape[1]
        S, B = like.shape[:2]
        s_idx = torch.arange(S).repeat_interleave(B)
        b_idx = torch.arange(B).repeat(S)
        if cu_seqlens is not None:
            assert B == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
            cu = cu_seqlens.long()
            # the kernel's find_doc: largest d < num_docs with cu[d] <= token
            doc = torch.tensor([max(d for d in range(len(cu) - 1) if cu[d] <= s) for s in s_idx.tolist()])
            pos = s_idx - cu[doc]
            frow = pos
        else:
            pos = s_idx
            frow = s_idx * freq_batch + (b_idx if freq_batch > 1 else 0)
        if positions is not None:
            assert positions.dtype == torch.int32 and positions.numel() == S * B
            qpos = positions.long()
        else:
            qpos = pos
        n = qpos.float() + 1
        if mode == 1:
            assert q_in is None or (ssmax_scale.dtype == torch.float32 and ssmax_scale.numel() == q_in.shape[2])
            log_n = torch.log(n)
            qfac = (log_n[:, None] * ssmax_scale[None, :]) if q_in is not None else None
        elif mode == 2:
            log_n = None
            qfac = (torch.log(torch.floor(n / floor_scale) + 1) * attn_scale + 1)[:, None]
        else:
            log_n, qfac = None, None
        bad = torch.zeros(S * B, dtype=torch.bool)
        if rotate:
            assert cos.dtype == torch.float32 and cos.is_contiguous() and cos.shape == sin.shape
            bad = frow >= cos.shape[0]
            c = cos[frow.clamp(max=cos.shape[0] - 1)]
            sn = sin[frow.clamp(max=cos.shape[0] - 1)]

        def transform(x4, fac, inv):
            x = x4.float().reshape(S * B, x4.shape[2], x4.shape[3])
            if rotate:
                r = c.shape[1]
                h = r // 2
                c1, c2, s1, s2 = c[:, None, :h], c[:, None, h:], sn[:, None, :h], sn[:, None, h:]
                x1, x2 = x[..., :h], x[..., h:r]
                if inv:
                    y = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1, x[..., r:]], -1)
                else:
                    y = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, x[..., r:]], -1)
            else:
                y = x
            if fac is not None:
                y = y * fac[:, :, None]
            y[bad] = float("nan")
            return y

        if q_in is not None:
            y = transform(q_in, qfac, inverse)
            if ds_partial is not None:
                assert inverse and mode == 1 and q_saved is not None and ds_partial.dtype == torch.float32
                assert ds_partial.numel() == S * B * q_in.shape[2]
                rq = transform(q_saved, None, False)
                g = q_in.float().reshape(S * B, q_in.shape[2], -1)
                ds_partial.copy_(((g * rq).sum(-1) * log_n[:, None]).reshape(-1))
            q_out.copy_(y.view(q_out.shape))
        if k_in is not None:
            k_out.copy_(transform(k_in, None, inverse).view(k_out.shape))


@pytest.fixture(params=["fake", "emulated"])
def fake(request, monkeypatch):
    """The ops' kernel module: ``FakeKernels`` (the contract in PyTorch) or ``EmulatedKernels`` (the
    real csrc/kernels source, compiled for the CPU emulator in tests/cuda_emu)."""
    kern = FakeKernels() if request.param == "fake" else EmulatedKernels()
    monkeypatch.setattr(rs, "use_kernels_for", lambda *t: kern)
    monkeypatch.setattr(ce_heads, "use_kernels_for", lambda *t: kern)
    return kern


def _freqs(n, rot):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.outer(torch.arange(n).float(), inv)
    return torch.cat([ang, ang], -1)[:, None, None, :]


@pytest.mark.parametrize("layout", ["sbhd", "thd"])
@pytest.mark.parametrize("mode", ["none", "ssmax", "temperature"])
def test_rope_dispatch_matches_reference(fake, layout, mode):
    g = torch.Generator().manual_seed(0)
    if layout == "thd":
        cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
        q = torch.randn(13, 4, 12, generator=g)
        k = torch.randn(13, 2, 12, generator=g)
    else:
        cu = None
        q = torch.randn(9, 2, 4, 12, generator=g)
        k = torch.randn(9, 2, 2, 12, generator=g)
    s = torch.rand(4, generator=g) + 0.5
    freqs = _freqs(9, 8)  # rot_dim 8 < head dim 12
    kw = dict(mode=mode, floor_scale=3.0, attn_scale=0.2, cu_seqlens=cu)
    res = []
    for fn in (rs.apply_rope_and_query_scale, rs.reference_rope_and_query_scale):
        qq, kk, ss = (t.clone().requires_grad_() for t in (q, k, s))
        qo, ko = fn(qq, kk, freqs, ssmax_scale=ss, **kw)
        # expanded (stride-0) upstream gradients, as from .sum(), must be handled
        (qo.sum() * 0.5 + (ko * torch.linspace(-1, 1, ko.shape[-1])).sum()).backward()
        res.append((qo, ko, qq.grad, kk.grad, ss.grad))
    assert ("rope_query_scale", False) in fake.calls and ("rope_query_scale", True) in fake.calls
    for a, b in zip(*res):
        if b is None:
            assert a is None or mode != "ssmax"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_dispatch_k_unused_nope_and_positions(fake):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 2, 2, 8, generator=g, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(6, 2, 1, 8, generator=g, dtype=torch.bfloat16).requires_grad_()
    s = torch.tensor([0.3, 0.7], requires_grad=True)
    pid = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    qo, ko = rs.apply_rope_and_query_scale(q, k, _freqs(6, 8), mode="ssmax", ssmax_scale=s, position_ids=pid)
    ko.float().sum().backward()  # only k reaches the loss: no q grad, no scale grad
    assert q.grad is None and s.grad is None and k.grad is not None
    qo2, ko2 = rs.apply_rope_and_query_scale(q, k, None, apply_rope=False, mode="temperature", floor_scale=2.0)
    assert ko2 is k
    ref, _ = rs.reference_rope_and_query_scale(q, k, None, apply_rope=False, mode="temperature", floor_scale=2.0)
    torch.testing.assert_close(qo2, ref)
    qr, _ = rs.reference_rope_and_query_scale(q, k, _freqs(6, 8), mode="ssmax", ssmax_scale=s, position_ids=pid)
    torch.testing.assert_close(qo, qr)


def test_rope_dispatch_short_freqs_give_nan_not_garbage(fake):
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)  # a 7-token document, freqs for 4 positions
    q = torch.randn(10, 2, 8)
    qo, _ = rs.apply_rope_and_query_scale(q, None, _freqs(4, 8), cu_seqlens=cu)
    assert torch.isnan(qo[7:]).all() and torch.isfinite(qo[:7]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_bytes,upstream_kind", [(None, "megatron"), (4096, "megatron"), (2048, "arbitrary"),
                                                      (100000, "megatron")])
def test_cross_entropy_dispatch_matches_reference(fake, monkeypatch, dtype, tile_bytes, upstream_kind):
    """Kernel branch vs reference on the new schedule: gradients in the forward (stats, in-place
    softmax - onehot, two GEMMs per chunk), rescaled in backward for megatron's upstream; recomputed
    (the same kernels again) for an arbitrary one."""
    if tile_bytes:
        monkeypatch.setattr(ce_chunks, "TILE_BYTES", tile_bytes)
        monkeypatch.setattr(ce_chunks, "MIN_GRAD_CHUNK_ROWS", 1)
    g = torch.Generator().manual_seed(2)
    S, B, H, V = 10, 2, 16, 37
    xs = [torch.randn(S, B, H, generator=g).to(dtype) for _ in range(3)]
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = [torch.randint(0, V, (B, S), generator=g) for _ in range(3)]
    labels[1][0, 3] = -100
    masks = [torch.ones(B, S) for _ in range(3)]
    masks[2][:, -2:] = 0
    if upstream_kind == "megatron":  # masked means with a loss scale of 256
        upstream = [256 * m / m.sum() for m in masks]
        weights = [1.0 / m.sum() for m in masks]
    else:
        upstream = [m * torch.rand(m.shape, generator=g) for m in masks]
        weights = None
    kw = dict(loss_masks=masks, z_loss_weight=1e-3, scales=[1.0, 0.05, 0.05], upstream_weights=weights)
    res = []
    for fn in (fce.fused_mtp_cross_entropy, fce.reference_mtp_cross_entropy):
        xx = [x.clone().requires_grad_() for x in xs]
        ww = w.clone().requires_grad_()
        before = dict(fce.backward_path_counts)
        losses = fn(xx, ww, labels, **kw)
        sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
        path = "stored" if upstream_kind == "megatron" else "recomputed"
        assert fce.backward_path_counts[path] == before[path] + 1
        res.append((losses, ww.grad, [x.grad for x in xx]))
    assert "ce_forward_stats" in fake.calls and "ce_backward_inplace" in fake.calls
    (kl, kw_, kx), (rl, rw, rx) = res
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for a, b in zip(kl, rl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw_.float(), rw.float(), **tol)
    for a, b in zip(kx, rx):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert not math.isnan(float(kw_.float().sum()))
