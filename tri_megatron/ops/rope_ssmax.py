"""Fused RoPE + per-query scale (SSMax / Llama-4 temperature tuning) for q and k.

API::

    q, k = apply_rope_and_query_scale(q, k, freqs, *, apply_rope=True, mode="none",
                                      ssmax_scale=None, floor_scale=8192.0, attn_scale=0.1,
                                      cu_seqlens=None, position_ids=None, mscale=1.0)

Layouts (megatron's): sbhd ``q [s, b, hq, d]``, ``k [s, b, hkv, d]``; or packed thd ``q [t, hq, d]``,
``k [t, hkv, d]`` when ``cu_seqlens`` (int32 ``[num_docs + 1]``) is given. ``k`` may be None.

RoPE matches ``megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb`` with
``rotary_interleaved=False`` exactly (cos / sin of the fp32 ``freqs`` times ``mscale``; the first
``rot_dim = freqs.shape[-1]`` dims rotate in "rotate_half" pairs (j, j + rot_dim/2), the rest pass
through). ``freqs`` is what megatron's ``RotaryEmbedding`` returns, ``[s, 1, 1, rot_dim]`` (or
``[s, b, 1, rot_dim]``); sbhd token (s, b) uses row s (and b when the second dim is b); thd tokens use
the row of their position within their document, i.e. megatron's thd path with ``freqs`` of the
maximum document length, as megatron's GPTModel builds it for packed sequences (context parallelism
is not supported here). A token whose document is longer than ``freqs`` raises on CPU and comes out
NaN from the CUDA kernel (no device sync to check it).

Query factor (q only; k is never scaled), per token position ``pos`` (0-based within its document for
thd; the sequence index for sbhd; or ``position_ids`` when given, ``[b, s]`` for sbhd / ``[t]`` for
thd, which then affect the factor only, never the RoPE angles):

* ``mode="ssmax"``: ``ssmax_scale[h] * log(pos + 1)`` (SSMax, n = keys seen = pos + 1; for a sliding
  window pass ``position_ids = min(pos, window - 1)``); ``ssmax_scale`` is this rank's learnable
  ``[hq]`` tensor and receives its gradient.
* ``mode="temperature"``: ``log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1`` (Llama 4 /
  Tri-70B NoPE layers; no parameters).
* ``mode="none"``: 1 (plain RoPE).

``apply_rope=False`` (NoPE layers of iRoPE) scales q only; ``freqs`` may then be None and ``k`` is
returned untouched. Outputs are new tensors in the input dtype (fp32 math, one rounding).

On CUDA with the compiled kernels loaded (see :mod:`tri_megatron.ops._kernels`), forward and backward
are one kernel launch each over q and k; everywhere else the PyTorch reference below runs (the CPU
path and the oracle of the kernel tests). Only the SSMax scale gradient needs a saved activation (the
input q); the other modes save nothing the size of q.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from tri_megatron.ops._kernels import use_kernels_for

__all__ = [
    "apply_rope_and_query_scale",
    "query_scale_factor",
    "document_positions",
    "reference_rope_and_query_scale",
]

_MODE_ID = {"none": 0, "ssmax": 1, "temperature": 2}
_MODE_NAME = {v: k for k, v in _MODE_ID.items()}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def document_positions(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """0-based position of every packed token within its document ([total] int64)."""
    cu = cu_seqlens.to(torch.long)
    total = int(cu[-1]) if total is None else total
    tok = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], tok, right=True)
    return tok - cu[doc]


def query_scale_factor(positions: torch.Tensor, mode: str, *, ssmax_scale: Optional[torch.Tensor] = None,
                       floor_scale: float = 8192.0, attn_scale: float = 0.1,
                       dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The query factor for 0-based ``positions [...]``: ``[..., hq]`` for SSMax, ``[..., 1]`` for
    temperature tuning, None for ``mode="none"``. Differentiable in ``ssmax_scale``."""
    if mode == "none":
        return None
    n = positions.to(dtype) + 1.0
    if mode == "ssmax":
        if ssmax_scale is None:
            raise ValueError("mode='ssmax' needs ssmax_scale")
        return torch.log(n)[..., None] * ssmax_scale.to(dtype)
    if mode == "temperature":
        return (torch.log(torch.floor(n / floor_scale) + 1.0) * attn_scale + 1.0)[..., None]
    raise ValueError(f"unknown query-scale mode {mode!r}; expected one of {sorted(_MODE_ID)}")


# --------------------------------------------------------------------------- shared plan / reference ----
class _Plan:
    """Non-tensor settings of one call."""

    def __init__(self, *, thd, seq, batch, freq_batch, mode, rotate, floor_scale, attn_scale, use_kernels):
        self.thd, self.seq, self.batch, self.freq_batch = thd, seq, batch, freq_batch
        self.mode, self.rotate = mode, rotate
        self.floor_scale, self.attn_scale = float(floor_scale), float(attn_scale)
        self.use_kernels = use_kernels


def _rows_reference(plan: _Plan, cu_seqlens, positions, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(freq-table row, factor position) per token row (row = s * B + b), int64."""
    if cu_seqlens is not None:
        if cu_seqlens.device.type == "cpu" and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != plan.seq):
            raise ValueError(f"cu_seqlens must run from 0 to {plan.seq}, got {cu_seqlens.tolist()}")
        doc_pos = document_positions(cu_seqlens.to(device), plan.seq)
        freq_row = doc_pos
    else:
        s = torch.arange(plan.seq, device=device).repeat_interleave(plan.batch)
        b = torch.arange(plan.batch, device=device).repeat(plan.seq)
        doc_pos = s
        freq_row = s * plan.freq_batch + (b if plan.freq_batch > 1 else 0)
    pos = positions.to(device=device, dtype=torch.long) if positions is not None else doc_pos
    return freq_row, pos


def _rotate(x: torch.Tensor, cos_r: torch.Tensor, sin_r: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate-half RoPE (or its transpose) on the first rot_dim dims of x; cos_r / sin_r broadcast."""
    r = cos_r.shape[-1]
    half = r // 2
    x1, x2, xp = x[..., :half], x[..., half:r], x[..., r:]
    c1, c2, s1, s2 = cos_r[..., :half], cos_r[..., half:], sin_r[..., :half], sin_r[..., half:]
    if not inverse:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    else:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    return torch.cat([y1, y2, xp], dim=-1)


class _Reference:
    """PyTorch implementation of the kernel's forward / transpose on [S, B, H, D] views."""

    def __init__(self, plan, cos, sin, cu_seqlens, positions, scale, device, cdtype):
        self.cdtype, self.rotate = cdtype, plan.rotate
        freq_row, pos = _rows_reference(plan, cu_seqlens, positions, device)
        shape = (plan.seq, plan.batch, 1)
        if plan.rotate:
            # (checked where it costs no device sync; the kernel writes NaN for such tokens)
            if freq_row.device.type == "cpu" and freq_row.numel() and int(freq_row.max()) >= cos.shape[0]:
                raise ValueError(f"freqs has {cos.shape[0]} rows; tokens need {int(freq_row.max()) + 1}")
            self.cos_r = cos.to(cdtype)[freq_row].view(*shape, -1)
            self.sin_r = sin.to(cdtype)[freq_row].view(*shape, -1)
        self.log_n = torch.log(pos.to(cdtype) + 1.0).view(*shape)
        f = query_scale_factor(pos, _MODE_NAME[plan.mode], ssmax_scale=scale,
                               floor_scale=plan.floor_scale, attn_scale=plan.attn_scale, dtype=cdtype)
        self.factor = None if f is None else f.view(plan.seq, plan.batch, -1, 1)

    def apply(self, x4, *, inverse: bool, scaled: bool, out_dtype=None) -> torch.Tensor:
        y = x4.to(self.cdtype)
        if self.rotate:
            y = _rotate(y, self.cos_r, self.sin_r, inverse)
        if scaled and self.factor is not None:
            y = y * self.factor
        return y.to(out_dtype or x4.dtype)


# --------------------------------------------------------------------------- autograd function ---------
def _as4(x: Optional[torch.Tensor], thd: bool) -> Optional[torch.Tensor]:
    """[S, B, H, D] view (thd: [T, 1, H, D]) with unit stride on D, as the kernel wants."""
    if x is None:
        return None
    if x.stride(-1) != 1:  # e.g. the expanded gradient of a .sum()
        x = x.contiguous()
    return x.unsqueeze(1) if thd else x


def _from4(x: Optional[torch.Tensor], thd: bool) -> Optional[torch.Tensor]:
    return None if x is None else (x.squeeze(1) if thd else x)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _kernel_for(plan: _Plan, a: Optional[torch.Tensor], b: Optional[torch.Tensor]):
    """The kernel module when it may run on these (q-like, k-like) tensors, else None."""
    if not plan.use_kernels:
        return None
    kern = use_kernels_for(a, b)
    present = [t for t in (a, b) if t is not None]
    if kern is None or any(t.dtype not in _KERNEL_DTYPES or t.dtype != present[0].dtype for t in present):
        return None
    return kern


def _empty_like(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


class _RopeQueryScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, cos, sin, cu_seqlens, positions, plan):
        ctx.set_materialize_grads(False)  # an unused q or k output costs no backward pass
        thd = plan.thd
        q4, k4 = _as4(q, thd), _as4(k, thd)
        need_ds = scale is not None and ctx.needs_input_grad[2]
        scale_c = None if scale is None else scale.detach().to(_compute_dtype(scale)).contiguous()
        kern = _kernel_for(plan, q4, k4)
        if kern is not None:
            q_out, k_out = _empty_like(q4), _empty_like(k4)
            kern.rope_query_scale(q4, q_out, k4, k_out, cos, sin, plan.freq_batch, cu_seqlens, positions,
                                  None if scale_c is None else scale_c.float(), None, None, plan.mode,
                                  plan.rotate, False, plan.floor_scale, plan.attn_scale)
        else:
            ref = _Reference(plan, cos, sin, cu_seqlens, positions, scale_c, q.device,
                             _compute_dtype(q, k, scale))
            q_out = ref.apply(q4, inverse=False, scaled=True)
            k_out = None if k4 is None else ref.apply(k4, inverse=False, scaled=False)
        ctx.plan, ctx.need_ds, ctx.has_k = plan, need_ds, k is not None
        ctx.scale_dtype = None if scale is None else scale.dtype
        ctx.save_for_backward(cos, sin, cu_seqlens, positions, scale_c, q if need_ds else None)
        if k is None:
            return _from4(q_out, thd)
        return _from4(q_out, thd), _from4(k_out, thd)

    @staticmethod
    def backward(ctx, gq, gk=None):
        plan, thd = ctx.plan, ctx.plan.thd
        cos, sin, cu_seqlens, positions, scale, q_saved = ctx.saved_tensors
        gq4 = _as4(gq, thd)
        gk4 = _as4(gk, thd) if ctx.has_k else None
        dq4 = dk4 = ds = None
        want_ds = ctx.need_ds and gq4 is not None
        kern = _kernel_for(plan, gq4, gk4) if (gq4 is not None or gk4 is not None) else None
        if kern is not None:
            dq4, dk4 = _empty_like(gq4), _empty_like(gk4)
            ds_partial = None
            if want_ds:
                ds_partial = torch.empty(plan.seq * plan.batch * gq4.shape[2], dtype=torch.float32,
                                         device=gq4.device)
            kern.rope_query_scale(gq4, dq4, gk4, dk4, cos, sin, plan.freq_batch, cu_seqlens, positions,
                                  None if scale is None else scale.float(),
                                  _as4(q_saved, thd) if want_ds else None, ds_partial, plan.mode,
                                  plan.rotate, True, plan.floor_scale, plan.attn_scale)
            if want_ds:
                ds = ds_partial.view(-1, gq4.shape[2]).sum(0)
        elif gq4 is not None or gk4 is not None:
            like = gq4 if gq4 is not None else gk4
            cdtype = _compute_dtype(gq4, gk4, scale)
            ref = _Reference(plan, cos, sin, cu_seqlens, positions, scale, like.device, cdtype)
            if gq4 is not None:
                dq4 = ref.apply(gq4, inverse=True, scaled=True)
                if want_ds:
                    rq = ref.apply(_as4(q_saved, thd), inverse=False, scaled=False, out_dtype=cdtype)
                    ds = ((gq4.to(cdtype) * rq).sum(-1) * ref.log_n).sum(dim=(0, 1))
            if gk4 is not None:
                dk4 = ref.apply(gk4, inverse=True, scaled=False)
        if ds is not None:
            ds = ds.to(ctx.scale_dtype)
        return _from4(dq4, thd), _from4(dk4, thd), ds, None, None, None, None, None


# --------------------------------------------------------------------------- public API -----------------
def apply_rope_and_query_scale(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    freqs: Optional[torch.Tensor],
    *,
    apply_rope: bool = True,
    mode: str = "none",
    ssmax_scale: Optional[torch.Tensor] = None,
    floor_scale: float = 8192.0,
    attn_scale: float = 0.1,
    cu_seqlens: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    mscale: float = 1.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """RoPE on q and k and the query factor on q (see the module docstring). Returns ``(q, k)``."""
    return _apply(q, k, freqs, apply_rope=apply_rope, mode=mode, ssmax_scale=ssmax_scale,
                  floor_scale=floor_scale, attn_scale=attn_scale, cu_seqlens=cu_seqlens,
                  position_ids=position_ids, mscale=mscale, use_kernels=True)


def reference_rope_and_query_scale(q, k, freqs, **kwargs):
    """Same as :func:`apply_rope_and_query_scale` but always the PyTorch reference, on any device
    (the oracle of the kernel tests, and the stock-path baseline of the benchmark)."""
    return _apply(q, k, freqs, use_kernels=False, **kwargs)


def _apply(q, k, freqs, *, apply_rope=True, mode="none", ssmax_scale=None, floor_scale=8192.0,
           attn_scale=0.1, cu_seqlens=None, position_ids=None, mscale=1.0, use_kernels=True):
    if mode not in _MODE_ID:
        raise ValueError(f"unknown query-scale mode {mode!r}; expected one of {sorted(_MODE_ID)}")
    if mode == "ssmax" and ssmax_scale is None:
        raise ValueError("mode='ssmax' needs ssmax_scale (the per-head learnable s)")
    if not apply_rope and mode == "none":
        return q, k
    thd = cu_seqlens is not None
    if q.dim() != (3 if thd else 4):
        raise ValueError(f"q must be {'[t, h, d] with cu_seqlens' if thd else '[s, b, h, d]'}, got {tuple(q.shape)}")
    seq, batch = q.shape[0], (1 if thd else q.shape[1])
    if k is not None and (k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or k.dim() != q.dim()
                          or (not thd and k.shape[1] != batch)):
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if mode == "ssmax" and ssmax_scale.numel() != q.shape[-2]:
        raise ValueError(f"ssmax_scale has {ssmax_scale.numel()} entries for {q.shape[-2]} q heads")

    cos = sin = None
    freq_batch = 1
    if apply_rope:
        if freqs is None:
            raise ValueError("apply_rope=True needs freqs")
        if freqs.dim() != 4 or freqs.shape[2] != 1 or freqs.shape[-1] % 2 or freqs.shape[-1] > q.shape[-1]:
            raise ValueError(f"freqs must be [s, 1 or b, 1, rot_dim<=d, even], got {tuple(freqs.shape)}")
        freq_batch = freqs.shape[1]
        if freq_batch not in (1, batch) or (thd and freq_batch != 1):
            raise ValueError(f"freqs batch dim {freq_batch} must be 1 or b={batch}")
        if not thd and freqs.shape[0] < seq:
            raise ValueError(f"freqs covers {freqs.shape[0]} positions, q has {seq}")
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        f = freqs.to(device=q.device, dtype=cdtype).reshape(-1, freqs.shape[-1])
        cos = (torch.cos(f) * mscale).contiguous()
        sin = (torch.sin(f) * mscale).contiguous()
        k_in = k
    else:
        k_in = None  # NoPE: k is not touched

    positions = None
    if position_ids is not None and mode != "none":
        pid = position_ids
        if not thd:
            if pid.dim() == 1:
                pid = pid[None, :].expand(batch, -1)
            pid = pid.t()
        positions = pid.reshape(-1).to(device=q.device, dtype=torch.int32).contiguous()
        if positions.numel() != seq * batch:
            raise ValueError(f"position_ids has {positions.numel()} entries for {seq * batch} tokens")
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()

    plan = _Plan(thd=thd, seq=seq, batch=batch, freq_batch=freq_batch, mode=_MODE_ID[mode],
                 rotate=apply_rope, floor_scale=floor_scale, attn_scale=attn_scale,
                 use_kernels=use_kernels)
    out = _RopeQueryScale.apply(q, k_in, ssmax_scale if mode == "ssmax" else None, cos, sin, cu,
                                positions, plan)
    if k_in is None:
        return out, k
    return out

