"""Backward-side helpers of the fused cross-entropy (``tri_megatron.ops.fused_cross_entropy``): the
upstream factor remembered per weight (what the next forward accumulates into ``main_grad`` with), the
check of the real upstream against the expected one (one host sync), and the exact chunked recompute
used when the stored gradients cannot be rescaled to it.
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch

from tri_megatron.ops import ce_chunks as chunks
from tri_megatron.ops.ce_heads import Heads, acc_dtype, kernel_for


def in_backward() -> bool:
    """Whether this runs inside an autograd backward pass (e.g. an activation-recompute forward)."""
    return torch._C._current_graph_task_id() != -1


# The common upstream factor last seen per weight (loss scale / micro-batches: constant over a run but
# for rampups and dynamic loss scaling), the guess the next forward accumulates into main_grad with.
# Keyed by id with a weak reference (tensors cannot be dict keys by value).
_SCALES: dict = {}


def scale_guess(weight: torch.Tensor) -> float:
    ref, c = _SCALES.get(id(weight), (None, None))
    return c if ref is not None and ref() is weight else 1.0


def remember_scale(weight: torch.Tensor, c: float) -> None:
    key = id(weight)
    _SCALES[key] = (weakref.ref(weight, lambda _ref: _SCALES.pop(key, None)), float(c))


def verdict(heads: Heads, ups, guess: Optional[float] = None):
    """One host sync on the upstream gradients ``ups`` (per head, None: unused). Returns (c, same, lost):
    c (float) with ``ups[k][t] == c * expect[k][t]`` on every valid token to 8 ulp, else None; ``same``:
    c equals ``guess`` to 8 ulp; ``lost[k]``: head k gets an upstream on a valid token where its expected
    one is 0 (its stored hidden gradient cannot be rescaled to it)."""
    got = [g if g is not None else torch.zeros_like(e) for g, e in zip(ups, heads.expect)]
    on = torch.cat(heads.valid) != 0
    e, g = torch.cat(heads.expect), torch.cat(got)
    e, g = torch.where(on, e, torch.zeros_like(e)), torch.where(on, g, torch.zeros_like(g))
    c = (g * e).sum() / (e * e).sum().clamp_min(torch.finfo(e.dtype).tiny)
    tol = 8 * torch.finfo(g.dtype).eps
    ok = torch.isfinite(c) & ((g - c * e).abs() <= tol * (c * e).abs()).all()
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    same = ok & ((c - (guess or 0.0)).abs() <= tol * c.abs())
    lost = [((ek == 0) & (vk != 0) & (gk != 0)).any() for ek, vk, gk in zip(heads.expect, heads.valid, got)]
    flags = torch.stack([ok.to(c.dtype), same.to(c.dtype), c, *[x.to(c.dtype) for x in lost]]).tolist()
    ok, same, c_value = bool(flags[0]), bool(flags[1]), flags[2]
    return (c_value if ok else None), bool(same and guess is not None), [bool(x) for x in flags[3:]]


def recompute(heads, weight, hiddens, ups, lse_all, sizes, need_x, need_w, alpha: float = 1.0):
    """Exact gradients for any upstream (the unfused backward, chunked): per chunk, logits GEMM,
    softmax - onehot scaled by the upstream, hidden-grad GEMM and / or weight-grad GEMM (into
    ``main_grad`` when set; the weight gradient times ``alpha``). Returns
    (hidden grads per head or None, weight grad or None)."""
    vocab, h = weight.shape
    vocab_start = heads.rank * vocab
    kern = kernel_for(heads, weight)
    main_grad = heads.main_grad
    acc = None
    if need_w:
        acc = main_grad if main_grad is not None else torch.zeros(
            vocab, h, dtype=acc_dtype(weight.dtype), device=weight.device)
    chunk = max(1, min(heads.chunk_size or chunks.default_chunk_size(vocab, weight.dtype, max(sizes), True,
                                                                     weight.device), max(sizes)))
    buf = torch.empty(chunk * vocab, dtype=weight.dtype, device=weight.device)
    gx: List[Optional[torch.Tensor]] = [None] * len(hiddens)
    off = 0
    for k, hid in enumerate(hiddens):
        x = hid.reshape(-1, h)
        n = sizes[k]
        if ups[k] is not None and (need_w or need_x[k]):
            gx[k] = torch.empty_like(x) if need_x[k] else None
            t_coef = heads.coef(k, ups[k])
            lse = lse_all[off:off + n]
            p_coef = (t_coef * (1.0 + 2.0 * heads.z_loss * lse)).contiguous() if heads.z_loss else t_coef
            for c0 in range(0, n, chunk):
                c1 = min(c0 + chunk, n)
                g = torch.mm(x[c0:c1], weight.t(), out=chunks.tile(buf, c1 - c0, vocab))
                chunks.chunk_grad_inplace(kern, g, heads.labels[k][c0:c1], vocab_start, lse[c0:c1].contiguous(),
                                          p_coef[c0:c1], t_coef[c0:c1])
                if need_x[k]:
                    torch.mm(g, weight, out=gx[k][c0:c1])
                if need_w:
                    chunks.accumulate_mm(acc, g.t(), x[c0:c1], alpha)
        off += n
    del buf
    if acc is None or main_grad is not None:
        return gx, None
    return gx, (acc if acc.dtype == weight.dtype else acc.to(weight.dtype))
