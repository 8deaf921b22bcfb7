"""Per-chunk primitives of the fused cross-entropy (``tri_megatron.ops.fused_cross_entropy``): how many
token rows a logits tile takes, the row statistics and the in-place softmax-minus-one-hot of one tile
(the CUDA kernels, or their PyTorch reference on CPU), the merge of the statistics over the
tensor-parallel vocab shards, and the weight-gradient accumulation into an fp32 buffer.

The autograd function calls these through this module (``ce_chunks.accumulate_mm``...), so tests and
``tools/bench_kernels.py`` may replace them or lower ``TILE_BYTES`` / ``MIN_GRAD_CHUNK_ROWS*`` to keep
the tiling of full-size runs at reduced sizes.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist

# Byte budget of one logits tile (the default chunking); tools and tests may lower it to keep the
# tiling structure of full-size runs at reduced sizes.
TILE_BYTES = 64 * 2**20
# With gradients, every chunk re-reads and re-writes the whole [V/tp, h] weight-gradient accumulator
# in its GEMM 3: on a GPU chunks are at least this many token rows (or the whole head), so that GEMM
# stays compute-bound (2,048 rows: 512 FLOP per accumulator byte); a CPU needs far fewer.
MIN_GRAD_CHUNK_ROWS = 2048
MIN_GRAD_CHUNK_ROWS_CPU = 128


def default_chunk_size(vocab_local: int, dtype: torch.dtype, rows: int, grads: bool = False,
                       device: Union[str, torch.device] = "cuda") -> int:
    """Token rows per chunk: a logits chunk of about ``TILE_BYTES`` (64 MiB), with gradients at least
    ``MIN_GRAD_CHUNK_ROWS`` on a GPU (``MIN_GRAD_CHUNK_ROWS_CPU`` on CPU), in [1, rows]."""
    elem = torch.empty((), dtype=dtype).element_size()
    chunk = TILE_BYTES // max(1, vocab_local * elem)
    if grads:
        cpu = torch.device(device).type == "cpu"
        chunk = max(chunk, MIN_GRAD_CHUNK_ROWS_CPU if cpu else MIN_GRAD_CHUNK_ROWS)
    return max(1, min(rows, chunk))


def _ref_row_blocks(logits: torch.Tensor, in_place: bool = False):
    """Row blocks for the PyTorch reference. Work done in place on the tile takes it whole (few large
    ops); work with fp32 temporaries goes in blocks of 1/8 of a tile, so the temporaries stay small
    next to it (the kernels have none) and CPU memory figures reflect the fused design."""
    step = logits.shape[0] if in_place else max(1, (TILE_BYTES // 8) // max(1, logits.shape[1] * 4))
    for r0 in range(0, logits.shape[0], max(1, step)):
        yield slice(r0, min(r0 + step, logits.shape[0]))


def chunk_stats(kern, logits, labels, vocab_start, row_max, row_sumexp, target):
    """Per-row max, sum exp(x - max), target logit (0 outside this shard) of one logits chunk."""
    if kern is not None:
        kern.ce_forward_stats(logits, labels, vocab_start, row_max, row_sumexp, target)
        return
    vocab = logits.shape[1]
    for rb in _ref_row_blocks(logits):
        lf = logits[rb].to(row_max.dtype)
        m = lf.amax(dim=-1)
        row_max[rb] = m
        row_sumexp[rb] = torch.exp(lf - m[:, None]).sum(dim=-1)
        t = labels[rb] - vocab_start
        inside = (t >= 0) & (t < vocab)
        picked = logits[rb].gather(1, t.clamp(0, vocab - 1)[:, None])[:, 0].to(target.dtype)
        target[rb] = torch.where(inside, picked, torch.zeros_like(picked))


def chunk_grad_inplace(kern, logits, labels, vocab_start, lse, p_coef, t_coef):
    """logits <- p_coef * exp(logits - lse) - t_coef * onehot(label), in the logits' dtype."""
    if kern is not None:
        kern.ce_backward_inplace(logits, labels, vocab_start, lse, p_coef, t_coef)
        return
    vocab = logits.shape[1]
    for rb in _ref_row_blocks(logits, in_place=logits.dtype == lse.dtype):
        blk = logits[rb]
        if blk.dtype == lse.dtype:  # fp32 / fp64 tiles: in place, no temporary
            g = blk.sub_(lse[rb, None]).exp_().mul_(p_coef[rb, None])
        else:  # 16-bit tiles: fp32 math, one rounding to the tile's dtype (as the kernel)
            g = torch.exp(blk.to(lse.dtype) - lse[rb, None]).mul_(p_coef[rb, None])
        t = labels[rb] - vocab_start
        rows = torch.nonzero((t >= 0) & (t < vocab), as_tuple=True)[0]
        g[rows, t[rows]] -= t_coef[rb][rows].to(g.dtype)
        if g is not blk:
            blk.copy_(g)


def chunk_loss_grad_ref(logits, labels, vocab_start, q, z_loss, lse, target) -> bool:
    """TP=1 reference, statistics and gradient in one go: lse and target logit of each row, and the
    tile overwritten by the loss gradient. Returns whether the row factor ``q`` is left out of the tile
    (the caller then applies it to the GEMM operands: the hidden-gradient rows after GEMM 2 and the
    hidden rows entering GEMM 3, ``[rows, h]`` each instead of a pass over the ``[rows, V]`` tile).

    fp32 / fp64 tiles are worked in place, ``softmax * (1 + 2 z lse) - onehot`` (q left out): a row max,
    the in-place softmax, and the row max of the softmax, which is ``exp(max - lse)`` (at least 1/V, so
    ``lse = max - log(that)`` loses nothing), then the one-hot. 16-bit tiles: fp32 row blocks, the tile
    written once as ``(softmax * (1 + 2 z lse) - onehot) * q`` (one rounding of the whole gradient)."""
    vocab = logits.shape[1]
    in_place = logits.dtype == lse.dtype
    for rb in _ref_row_blocks(logits, in_place=in_place):
        blk = logits[rb]
        t = labels[rb] - vocab_start
        col = t.clamp(0, vocab - 1)[:, None]
        picked = blk.gather(1, col)[:, 0].to(target.dtype)
        target[rb] = torch.where((t >= 0) & (t < vocab), picked, torch.zeros_like(picked))
        if in_place:
            m = blk.amax(dim=-1)
            e = torch.softmax(blk, dim=-1, out=blk)
            lse_b = m - torch.log(e.amax(dim=-1))
            if z_loss:
                e.mul_((1.0 + 2.0 * z_loss * lse_b)[:, None])
            sub = torch.ones_like(lse_b)
        else:
            e = blk.to(lse.dtype)
            m = e.amax(dim=-1)
            e.sub_(m[:, None]).exp_()
            s = e.sum(dim=-1)
            lse_b = torch.log(s) + m
            p = q[rb] * (1.0 + 2.0 * z_loss * lse_b) if z_loss else q[rb]
            e.mul_((p / s)[:, None])
            sub = q[rb]
        lse[rb] = lse_b
        rows = torch.nonzero(q[rb] != 0, as_tuple=True)[0]
        e[rows, t[rows]] -= sub[rows].to(e.dtype)
        if e is not blk:
            blk.copy_(e)
    return in_place


def global_lse(kern, world, tp_group, logits, labels, vocab_start, sdt):
    """(lse, target logit) per row of one chunk over the whole vocab (TP shards merged)."""
    stats = torch.empty(3, logits.shape[0], dtype=sdt, device=logits.device)
    row_max, sumexp, target = stats.unbind(0)
    chunk_stats(kern, logits, labels, vocab_start, row_max, sumexp, target)
    if world > 1:  # merge the vocab shards: global max, then rescaled sum-exp + target
        gmax = row_max.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp_group)
        packed = torch.stack([sumexp * torch.exp(row_max - gmax), target])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        row_max, (sumexp, target) = gmax, packed.unbind(0)
    return torch.log(sumexp) + row_max, target


_ADDMM_FP32_OK: dict = {}


def addmm_fp32_supported(device) -> bool:
    """Whether this torch can accumulate a bf16 / fp16 GEMM (times alpha) straight into an fp32 tensor (CUDA)."""
    key = str(device)
    if key not in _ADDMM_FP32_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
                b = torch.randn(16, 8, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc, alpha=0.5)
                ok = torch.allclose(acc, 1 + 0.5 * (a.float() @ b.float()), rtol=1e-2, atol=1e-2)
            except (RuntimeError, TypeError):
                ok = False
        _ADDMM_FP32_OK[key] = ok
    return _ADDMM_FP32_OK[key]


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * a @ b, where acc may be fp32 while a / b are bf16 / fp16 (no full-size temporaries;
    alpha applied to the fp32 product, never to an operand)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif addmm_fp32_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc, alpha=alpha)
    else:  # product rounded to the operand dtype, in row blocks small next to a tile (its fp32
        # upcast in add_ included), so the CPU path's memory reflects the CUDA path's
        step = max(1, (TILE_BYTES // 16) // max(1, b.shape[1] * 4))
        for r0 in range(0, a.shape[0], step):
            acc[r0:r0 + step].add_(a[r0:r0 + step] @ b, alpha=alpha)


def tile(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat reusable buffer."""
    return storage[: rows * cols].view(rows, cols)
