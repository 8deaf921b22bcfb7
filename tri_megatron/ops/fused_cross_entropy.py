"""Fused output-layer + softmax cross-entropy for the main head and the D MTP heads.

API::

    loss = fused_linear_cross_entropy(hidden, weight, labels, *, loss_mask=None, ignore_index=-100,
                                      tp_group=None, chunk_size=None, z_loss_weight=0.0, scale=1.0,
                                      vocab_chunk_size=None, accumulate_into_main_grad=False)
    losses = fused_mtp_cross_entropy(hiddens, weight, labels_list, *, loss_masks=None,
                                     ignore_index=-100, tp_group=None, chunk_size=None,
                                     z_loss_weight=0.0, scales=None, vocab_chunk_size=None,
                                     accumulate_into_main_grad=False)

* ``hidden``: ``[s, b, h]`` (megatron's sequence-first layout), fp32 / bf16 / fp16 (fp64 for tests),
  same dtype as ``weight``.
* ``weight``: this rank's vocab shard ``[V / tp, h]`` of the output layer (megatron's vocab-parallel
  ``ColumnParallelLinear`` weight: rank r holds rows ``[r V/tp, (r+1) V/tp)``); no bias.
* ``labels``: ``[b, s]`` int64 global vocab ids; ``loss_mask``: ``[b, s]``, tokens where it is 0 and
  tokens labelled ``ignore_index`` get loss 0 and no gradient.
* returns the per-token loss ``[b, s]`` fp32 (fp64 for fp64 inputs): on unmasked tokens
  ``scale * (logsumexp(logits) - logits[label] + z_loss_weight * logsumexp(logits) ** 2)`` with
  ``logits = hidden @ W_full^T`` -- for ``scale=1, z_loss_weight=0`` the values of megatron's
  ``vocab_parallel_cross_entropy(output_layer(hidden), labels.T).T`` (logits rounded to the input
  dtype by the GEMM, softmax in fp32). The caller applies its loss-mask-weighted mean afterwards.
  ``scale`` (e.g. the MTP scaling factor) multiplies value and gradient alike.
* ``fused_mtp_cross_entropy`` runs any number of heads (main + D MTP heads, D = 0 works) sharing
  ``weight`` in one autograd function and returns one loss per head; ``loss_masks`` / ``scales`` are
  per-head lists (entries may be None / default 1).

Tensor parallelism: ``tp_group`` is the tensor-parallel process group (None or size 1: no
communication). ``hidden`` must be the full sequence replicated on the TP ranks (as megatron's output
layer input after its sequence-parallel gather). Forward all-reduces per-token max (MAX) and rescaled
sum-exp + target logit (SUM) over ``tp_group`` -- two collectives per call, for all heads together.
Backward does **no** communication: the gradient returned for ``hidden`` is this vocab shard's
partial, exactly what megatron's ``ColumnParallelLinear`` computes before its input-grad all-reduce.
So the caller wraps the input as megatron does::

    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)        # SP off
    # or: hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)  # SP on
    loss = fused_linear_cross_entropy(hidden, output_layer.weight, labels, tp_group=tp_group)

How: the forward processes ``chunk_size`` token rows at a time against the whole vocab shard
(default: a logits chunk of ~128 MiB), so a full ``[tokens, V/tp]`` logits tensor is never stored; it
keeps only per-token max, sum-exp and target logit (and saves nothing but ``hidden`` and ``weight``,
which megatron's output layer saves too). The backward walks tiles of token chunks by the vocab shard (or by
vocab slices), recomputes each tile's logits (cuBLAS GEMM), overwrites them in place with
``(softmax * (1 + 2 z lse) - onehot) * dloss * scale * mask`` (the CUDA kernel; a PyTorch reference
on CPU), and feeds the tile to the input- and weight-gradient GEMMs. For bf16 / fp16 weights it picks
the cheapest of three workspace plans (``_backward_plan``): one tile per head with the weight gradient
summed over heads in its own dtype (exactly the rounding of the unfused path; high TP), an fp32
``[V/tp, h]`` weight-gradient accumulator over token chunks, or fp32 weight-gradient slices of
~128 MiB with the hidden gradients summed in fp32 over slices (low TP). Explicit ``chunk_size`` /
``vocab_chunk_size`` force the fp32 plans with those tiles.

``accumulate_into_main_grad=True`` mirrors megatron's ``gradient_accumulation_fusion``: the weight
gradient is added straight into ``weight.main_grad`` (captured at forward) and the op returns
megatron's dummy weight grad (setting ``weight.grad_added_to_main_grad``), so no weight-sized gradient
buffer is allocated at all. Label smoothing is not supported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from tri_megatron.ops._kernels import use_kernels_for

__all__ = ["fused_linear_cross_entropy", "fused_mtp_cross_entropy", "reference_mtp_cross_entropy",
           "default_chunk_size", "TILE_BYTES"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Byte budget of one logits tile and of the fp32 weight-grad slice (the default chunking); tools and
# tests may lower it to keep the tiling structure of full-size runs at reduced sizes.
TILE_BYTES = 128 * 2**20


def default_chunk_size(vocab_local: int, dtype: torch.dtype, rows: int) -> int:
    """Token rows per chunk so that one logits chunk is about ``TILE_BYTES`` (128 MiB), in [1, rows]."""
    elem = torch.empty((), dtype=dtype).element_size()
    return max(1, min(rows, TILE_BYTES // max(1, vocab_local * elem)))


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


# ------------------------------------------------------------------------ per-chunk primitives -------
def _ref_row_blocks(logits: torch.Tensor):
    """Row blocks for the PyTorch reference, so its fp32 temporaries stay ~1/8 of a logits tile (the
    kernels have none): CPU memory measurements then reflect the fused design, not the reference."""
    step = max(1, (TILE_BYTES // 8) // max(1, logits.shape[1] * 4))
    for r0 in range(0, logits.shape[0], step):
        yield slice(r0, min(r0 + step, logits.shape[0]))


def _chunk_stats(kern, logits, labels, vocab_start, row_max, row_sumexp, target):
    """Per-row max, sum exp(x - max), target logit (0 outside this shard) of one logits chunk."""
    if kern is not None:
        kern.ce_forward_stats(logits, labels, vocab_start, row_max, row_sumexp, target)
        return
    vocab = logits.shape[1]
    for rb in _ref_row_blocks(logits):
        lf = logits[rb].to(row_max.dtype, copy=True)
        m = lf.amax(dim=-1)
        row_max[rb] = m
        row_sumexp[rb] = torch.exp(lf.sub_(m[:, None])).sum(dim=-1)
        t = labels[rb] - vocab_start
        inside = (t >= 0) & (t < vocab)
        picked = logits[rb].gather(1, t.clamp(0, vocab - 1)[:, None])[:, 0].to(target.dtype)
        target[rb] = torch.where(inside, picked, torch.zeros_like(picked))


def _chunk_grad_inplace(kern, logits, labels, vocab_start, lse, p_coef, t_coef):
    """logits <- p_coef * exp(logits - lse) - t_coef * onehot(label), in the logits' dtype."""
    if kern is not None:
        kern.ce_backward_inplace(logits, labels, vocab_start, lse, p_coef, t_coef)
        return
    vocab = logits.shape[1]
    for rb in _ref_row_blocks(logits):
        # (for fp32 / fp64 logits the sub_ runs on the tile itself, which is overwritten below anyway)
        g = torch.exp(logits[rb].to(lse.dtype).sub_(lse[rb, None])).mul_(p_coef[rb, None])
        t = labels[rb] - vocab_start
        rows = torch.nonzero((t >= 0) & (t < vocab), as_tuple=True)[0]
        g[rows, t[rows]] -= t_coef[rb][rows]
        logits[rb] = g


_ADDMM_FP32_OK: dict = {}


def _addmm_fp32_supported(device) -> bool:
    """Whether this torch can accumulate a bf16 / fp16 GEMM straight into an fp32 tensor (CUDA)."""
    key = str(device)
    if key not in _ADDMM_FP32_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
                b = torch.randn(16, 8, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-2, atol=1e-2)
            except (RuntimeError, TypeError):
                ok = False
        _ADDMM_FP32_OK[key] = ok
    return _ADDMM_FP32_OK[key]


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, where acc may be fp32 while a / b are bf16 / fp16 (no full-size temporaries)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _addmm_fp32_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # product rounded to the operand dtype, in row blocks small next to a tile (its fp32
        # upcast in add_ included), so the CPU path's memory reflects the CUDA path's
        step = max(1, (TILE_BYTES // 16) // max(1, b.shape[1] * 4))
        for r0 in range(0, a.shape[0], step):
            acc[r0:r0 + step].add_(a[r0:r0 + step] @ b)


def _tile(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat reusable buffer."""
    return storage[: rows * cols].view(rows, cols)


# ------------------------------------------------------------------------ autograd function ----------
class _Heads:
    """Non-differentiable per-call state: flattened labels / masks per head, TP info, settings."""

    def __init__(self, labels, valid, scales, rank, world, tp_group, chunk_size, vocab_chunk_size,
                 z_loss, use_kernels, main_grad):
        self.labels, self.valid, self.scales = labels, valid, scales
        self.rank, self.world, self.tp_group = rank, world, tp_group
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size
        self.z_loss, self.use_kernels, self.main_grad = z_loss, use_kernels, main_grad


def _kernel(heads: _Heads, weight: torch.Tensor):
    if not heads.use_kernels or weight.dtype not in _KERNEL_DTYPES:
        return None
    return use_kernels_for(weight)


def _stat_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


_MIN_ACC_CHUNK_ROWS = 2048


def _backward_plan(*, vocab, hidden, elem, longest, x_rows, fp32_acc, chunk_size, vocab_chunk_size):
    """(plan, vocab rows per slice, token rows per chunk) of the backward.

    * ``"direct"``: the weight gradient needs no separate accumulator (fp32 / fp64 weights, or
      ``main_grad``): token chunks of ``TILE_BYTES`` against the whole shard, but at least
      ``_MIN_ACC_CHUNK_ROWS`` tokens (or the whole head), since every chunk re-reads and re-writes
      the whole ``[V/tp, h]`` weight gradient (TP=1 bf16: 2,048 rows are a 486 MiB tile).
    * ``"single"``: one chunk per head against the whole shard; the bf16 / fp16 weight gradient sums
      the heads in its own dtype -- the rounding of megatron's unfused path, where autograd adds the
      heads' weight gradients -- and needs no fp32 buffer. Picked when that tile is the cheapest.
    * ``"acc"``: token chunks, one fp32 ``[V/tp, h]`` weight-gradient accumulator.
    * ``"sliced"``: vocab slices of ``TILE_BYTES`` of fp32 weight-gradient accumulator, each over all
      heads and tokens, with the hidden gradients summed in fp32 over the slices.
    Without explicit sizes the cheapest of single / acc / sliced (in bytes of workspace) is used.
    """
    if not fp32_acc:
        vs = min(vocab_chunk_size or vocab, vocab)
        if not (chunk_size or vocab_chunk_size):
            rows = max(TILE_BYTES // max(1, vs * elem), _MIN_ACC_CHUNK_ROWS)
            return "direct", vs, max(1, min(rows, longest))
        plan = "direct"
    elif vocab_chunk_size or chunk_size:
        vs = min(vocab_chunk_size or vocab, vocab)
        plan = "sliced" if vs < vocab else "acc"
    else:
        slice_rows = min(vocab, max(1, TILE_BYTES // (hidden * 4)))
        costs = {
            "single": longest * vocab * elem,
            "acc": vocab * hidden * 4 + TILE_BYTES,
            "sliced": x_rows * hidden * 4 + slice_rows * hidden * 4 + TILE_BYTES,
        }
        # "acc" re-reads / re-writes the whole fp32 [V/tp, h] accumulator once per token chunk: only
        # worth it when chunks are long enough for the weight-grad GEMM to stay compute-bound
        if min(longest, TILE_BYTES // max(1, vocab * elem)) < min(longest, _MIN_ACC_CHUNK_ROWS):
            del costs["acc"]
        plan = min(costs, key=costs.get)
        vs = slice_rows if plan == "sliced" else vocab
        if plan == "single":
            return plan, vs, max(1, longest)
    chunk = max(1, min(chunk_size or max(1, TILE_BYTES // max(1, vs * elem)), longest))
    return plan, vs, chunk


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward: token chunks x full vocab shard -> per-row stats. Backward: tiles of
    (vocab slice) x (token chunk) as :func:`_backward_plan` decides."""

    @staticmethod
    def forward(ctx, heads: _Heads, weight: torch.Tensor, *hiddens: torch.Tensor):
        ctx.set_materialize_grads(False)  # a head whose loss is unused costs no backward work
        vocab, h = weight.shape
        vocab_start = heads.rank * vocab
        kern = _kernel(heads, weight)
        sdt = _stat_dtype(weight)
        xs = [x.reshape(-1, h) for x in hiddens]
        sizes = [x.shape[0] for x in xs]
        total, longest = sum(sizes), max(sizes)
        row_max = torch.empty(total, dtype=sdt, device=weight.device)
        sumexp, target = torch.empty_like(row_max), torch.empty_like(row_max)
        chunk = max(1, min(heads.chunk_size or default_chunk_size(vocab, weight.dtype, longest), longest))
        buf = torch.empty(chunk * vocab, dtype=weight.dtype, device=weight.device)
        logits = None  # the current chunk (a view of buf)
        off = 0
        for x, lab in zip(xs, heads.labels):
            for c0 in range(0, x.shape[0], chunk):
                c1 = min(c0 + chunk, x.shape[0])
                logits = torch.mm(x[c0:c1], weight.t(), out=_tile(buf, c1 - c0, vocab))
                sl = slice(off + c0, off + c1)
                _chunk_stats(kern, logits, lab[c0:c1], vocab_start, row_max[sl], sumexp[sl], target[sl])
            off += x.shape[0]
        del buf, logits
        if heads.world > 1:  # merge the vocab shards: global max, then rescaled sum-exp + target
            gmax = row_max.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=heads.tp_group)
            packed = torch.stack([sumexp * torch.exp(row_max - gmax), target])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=heads.tp_group)
            row_max, (sumexp, target) = gmax, packed.unbind(0)
        lse = torch.log(sumexp) + row_max
        loss = lse - target
        if heads.z_loss:
            loss = loss + heads.z_loss * lse * lse
        outs = []
        for hid, valid, sc, part in zip(hiddens, heads.valid, heads.scales, loss.split(sizes)):
            outs.append((part * valid * sc).view(hid.shape[0], hid.shape[1]).t().contiguous())
        ctx.heads, ctx.lse, ctx.sizes = heads, lse, sizes
        ctx.save_for_backward(weight, *hiddens)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_losses):
        heads, lse, sizes = ctx.heads, ctx.lse, ctx.sizes
        weight, *hiddens = ctx.saved_tensors
        vocab, h = weight.shape
        vocab_start = heads.rank * vocab
        kern = _kernel(heads, weight)
        need_w = ctx.needs_input_grad[1]
        acc_dt = _acc_dtype(weight.dtype)

        # heads that take part, with their per-row coefficients
        work = []
        off = 0
        for k, (hid, g_out) in enumerate(zip(hiddens, grad_losses)):
            n = sizes[k]
            need_x = ctx.needs_input_grad[2 + k]
            if g_out is not None and (need_x or need_w):
                lse_k = lse[off:off + n]
                coef = (g_out.t().reshape(-1).to(lse.dtype) * heads.valid[k] * heads.scales[k]).contiguous()
                p_coef = (coef * (1.0 + 2.0 * heads.z_loss * lse_k)).contiguous() if heads.z_loss else coef
                work.append((k, hid.reshape(-1, h), lse_k, p_coef, coef, need_x))
            off += n
        grads_h: List[Optional[torch.Tensor]] = [None] * len(hiddens)
        if not work:
            return (None, None, *grads_h)

        main_grad = heads.main_grad
        fp32_acc = need_w and main_grad is None and acc_dt != weight.dtype
        plan, vs, chunk = _backward_plan(
            vocab=vocab, hidden=h, elem=weight.element_size(), longest=max(x.shape[0] for _, x, *_ in work),
            x_rows=sum(x.shape[0] for _, x, _, _, _, need_x in work if need_x), fp32_acc=fp32_acc,
            chunk_size=heads.chunk_size, vocab_chunk_size=heads.vocab_chunk_size)
        sliced = vs < vocab
        buf = torch.empty(chunk * vs, dtype=weight.dtype, device=weight.device)
        g = None  # the current tile (a view of buf)

        gx = {k: (torch.zeros if sliced else torch.empty)(x.shape, dtype=acc_dt if sliced else x.dtype,
                                                           device=x.device)
              for k, x, _, _, _, need_x in work if need_x}
        grad_w = torch.empty_like(weight) if need_w and main_grad is None else None
        acc_slice = None
        if fp32_acc and plan != "single":
            acc_slice = torch.empty(vs * h, dtype=acc_dt, device=weight.device)

        for v0 in range(0, vocab, vs):
            v1 = min(v0 + vs, vocab)
            w_s = weight[v0:v1]
            acc = None
            if need_w:
                if main_grad is not None:
                    acc = main_grad[v0:v1]
                elif acc_slice is not None:
                    acc = _tile(acc_slice, v1 - v0, h).zero_()
                else:
                    acc = grad_w[v0:v1].zero_()
            for k, x, lse_k, p_coef, coef, need_x in work:
                labels = heads.labels[k]
                for c0 in range(0, x.shape[0], chunk):
                    c1 = min(c0 + chunk, x.shape[0])
                    g = torch.mm(x[c0:c1], w_s.t(), out=_tile(buf, c1 - c0, v1 - v0))
                    _chunk_grad_inplace(kern, g, labels[c0:c1], vocab_start + v0, lse_k[c0:c1],
                                        p_coef[c0:c1], coef[c0:c1])
                    if need_x:
                        if sliced:
                            _accumulate_mm(gx[k][c0:c1], g, w_s)
                        else:
                            torch.mm(g, w_s, out=gx[k][c0:c1])
                    if need_w:
                        _accumulate_mm(acc, g.t(), x[c0:c1])
            if acc_slice is not None:
                grad_w[v0:v1].copy_(acc)
        del buf, g, acc_slice  # free the tile before megatron's dummy weight grad is allocated

        for k, x, *_ in work:
            if k in gx:
                grads_h[k] = gx[k].to(hiddens[k].dtype).view(hiddens[k].shape)
        if need_w and main_grad is not None:
            grad_w = _main_grad_return(weight)
        return (None, grad_w, *grads_h)


def _main_grad_return(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """What megatron's linear layers return as weight grad after accumulating into ``main_grad``."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    dummy = make(weight.main_grad.shape, dtype=weight.dtype, device=weight.device, requires_grad=False)
    weight.grad_added_to_main_grad = True
    return dummy


# ------------------------------------------------------------------------ public API -----------------
def _prepare(hiddens, weight, labels_list, loss_masks, ignore_index, tp_group, chunk_size,
             vocab_chunk_size, z_loss_weight, scales, accumulate_into_main_grad, use_kernels) -> _Heads:
    if len(hiddens) != len(labels_list):
        raise ValueError(f"{len(hiddens)} hidden states but {len(labels_list)} label tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab/tp, hidden], got {tuple(weight.shape)}")
    loss_masks = list(loss_masks) if loss_masks is not None else [None] * len(hiddens)
    scales = list(scales) if scales is not None else [1.0] * len(hiddens)
    if len(loss_masks) != len(hiddens) or len(scales) != len(hiddens):
        raise ValueError("loss_masks and scales need one entry per head")
    for name, val in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if val is not None and val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    main_grad = None
    if accumulate_into_main_grad:
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None or tuple(main_grad.shape) != tuple(weight.shape):
            raise ValueError("accumulate_into_main_grad needs weight.main_grad shaped like weight")
    rank, world = _tp_info(tp_group)
    sdt = _stat_dtype(weight)
    labels, valid = [], []
    for x, lab, mask in zip(hiddens, labels_list, loss_masks):
        if x.dim() != 3 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden must be [s, b, {weight.shape[1]}], got {tuple(x.shape)}")
        if x.dtype != weight.dtype:
            raise ValueError(f"hidden dtype {x.dtype} differs from weight dtype {weight.dtype}")
        if tuple(lab.shape) != (x.shape[1], x.shape[0]):
            raise ValueError(f"labels must be [b, s] = {(x.shape[1], x.shape[0])}, got {tuple(lab.shape)}")
        lab_sb = lab.t().reshape(-1).to(device=weight.device, dtype=torch.long).contiguous()
        ok = lab_sb != ignore_index
        if mask is not None:
            if tuple(mask.shape) != tuple(lab.shape):
                raise ValueError(f"loss_mask must be [b, s] like labels, got {tuple(mask.shape)}")
            ok = ok & (mask.t().reshape(-1).to(lab_sb.device) != 0)
        labels.append(lab_sb)
        valid.append(ok.to(sdt))
    return _Heads(labels, valid, [float(s) for s in scales], rank, world, tp_group, chunk_size,
                  vocab_chunk_size, float(z_loss_weight), use_kernels, main_grad)


def fused_mtp_cross_entropy(
    hiddens: Sequence[torch.Tensor],
    weight: torch.Tensor,
    labels_list: Sequence[torch.Tensor],
    *,
    loss_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ignore_index: int = -100,
    tp_group=None,
    chunk_size: Optional[int] = None,
    z_loss_weight: float = 0.0,
    scales: Optional[Sequence[float]] = None,
    vocab_chunk_size: Optional[int] = None,
    accumulate_into_main_grad: bool = False,
    _use_kernels: bool = True,
) -> List[torch.Tensor]:
    """Per-token losses ``[b, s]`` of every head (main + MTP heads) in one autograd op."""
    if len(hiddens) == 0:
        return []
    heads = _prepare(hiddens, weight, labels_list, loss_masks, ignore_index, tp_group, chunk_size,
                     vocab_chunk_size, z_loss_weight, scales, accumulate_into_main_grad, _use_kernels)
    return list(_FusedLinearCrossEntropy.apply(heads, weight, *hiddens))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    tp_group=None,
    chunk_size: Optional[int] = None,
    z_loss_weight: float = 0.0,
    scale: float = 1.0,
    vocab_chunk_size: Optional[int] = None,
    accumulate_into_main_grad: bool = False,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of one head (see the module docstring)."""
    return fused_mtp_cross_entropy([hidden], weight, [labels], loss_masks=[loss_mask],
                                   ignore_index=ignore_index, tp_group=tp_group, chunk_size=chunk_size,
                                   z_loss_weight=z_loss_weight, scales=[scale],
                                   vocab_chunk_size=vocab_chunk_size,
                                   accumulate_into_main_grad=accumulate_into_main_grad)[0]


def reference_mtp_cross_entropy(hiddens, weight, labels_list, **kwargs) -> List[torch.Tensor]:
    """:func:`fused_mtp_cross_entropy` on the PyTorch reference path on any device (kernel oracle)."""
    return fused_mtp_cross_entropy(hiddens, weight, labels_list, _use_kernels=False, **kwargs)
