"""Fused output-layer + softmax cross-entropy for the main head and the D MTP heads, with the loss
gradients computed inside the forward pass (three GEMMs per token chunk, no logits recompute; under
megatron DDP the weight gradient goes into ``main_grad`` during the forward).

API::

    loss = fused_linear_cross_entropy(hidden, weight, labels, *, loss_mask=None, ignore_index=-100,
                                      tp_group=None, chunk_size=None, z_loss_weight=0.0, scale=1.0,
                                      upstream_weight=1.0, accumulate_into_main_grad=False)
    losses = fused_mtp_cross_entropy(hiddens, weight, labels_list, *, loss_masks=None,
                                     ignore_index=-100, tp_group=None, chunk_size=None,
                                     z_loss_weight=0.0, scales=None, upstream_weights=None,
                                     accumulate_into_main_grad=False)

* ``hidden``: ``[s, b, h]`` (megatron's sequence-first layout), fp32 / bf16 (fp64 for tests; fp16 runs,
  but its tiles hold the gradient for the expected upstream, e.g. probabilities / num_tokens, which
  fp16's range loses: tri_megatron refuses --fp16), same dtype as ``weight``.
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
  ``weight`` in one autograd function and returns one loss per head; ``loss_masks`` / ``scales`` /
  ``upstream_weights`` are per-head lists (entries may be None / default 1).

Schedule (training, i.e. grad mode on and an input needing a gradient): per chunk of ``chunk_size``
token rows of one head, against the whole vocab shard,

1. GEMM 1: logits tile ``x_c @ W^T`` (the only ``[rows, V/tp]`` buffer, reused by every chunk);
2. per-row max, sum-exp and target logit (CUDA kernel; a PyTorch reference on CPU); with TP, these
   rows' statistics are merged over the vocab shards right here (all-reduce MAX, then SUM of rescaled
   sum-exp + target: two small collectives per chunk), so the normaliser is the global one;
3. the tile is overwritten in place by ``(softmax * (1 + 2 z lse) - onehot) * q`` (CUDA kernel), with
   ``q = scale * loss_mask * upstream_weight`` on valid tokens and 0 elsewhere (the gradient for the
   expected upstream, rounded once). The CPU reference at TP=1 on fp32 / fp64 tiles does steps 2-3 as
   a row max, an in-place softmax and the softmax's row max (which gives lse), and leaves the row
   factor ``q`` to the GEMM operands below (``[rows, h]`` each, not a pass over the tile);
4. GEMM 2: ``grad_x_c = tile @ W`` (stored, the size of the hidden states);
   GEMM 3: ``G += tile^T @ x_c`` (into ``main_grad`` under megatron DDP, else one ``[V/tp, h]``
   accumulator, fp32 for bf16 / fp16 weights).

The backward does no GEMM on the fast path. The gradients are computed for an upstream gradient of
``upstream_weights[k] * loss_mask_k[t]`` on head k's per-token loss; megatron's schedule passes
``c * that`` with one scalar c (loss scale / micro-batches, the MTP scale set by
``MTPLossAutoScaler``): the caller says the per-head ratios, ``c`` arrives with the gradient. The
backward

* scales every stored hidden-gradient row by the upstream it received for that token (exact for any
  per-token upstream);
* finds c (least squares over the valid tokens of all heads) and checks that every valid token's
  upstream is ``c * upstream_weights[k] * loss_mask_k[t]`` to within 8 ulp of its dtype (one host
  sync);
* weight gradient, **into megatron DDP's ``main_grad``** (``accumulate_into_main_grad``): GEMM 3 already
  added ``c' * G`` into ``main_grad`` in the forward, with ``c'`` the factor this weight's last backward
  found (1 before the first), so nothing weight-sized is held from forward to backward. If the real
  upstream differs (the first micro-batch of a run, a rampup changing the micro-batch count) the
  backward adds ``(c - c') * G`` recomputed from the forward's own tiles (logits GEMM + weight-grad
  GEMM per chunk, the factor applied to the fp32 product: both parts round alike), and for an
  upstream not of the form above the weight gradient of ``upstream - c' * expected`` ("corrected").
  A forward run inside a backward pass (an activation recompute: reentrant ones are backwarded once,
  non-reentrant ones never) holds ``G`` instead, so recompute never adds a gradient twice.
* weight gradient **returned** (no ``main_grad``): ``G``, accumulated in the forward, is held and
  multiplied by c; if the upstream is not of the form above (``gradcheck``'s random vectors, one head's
  loss unused) it is recomputed exactly from the saved inputs. ``backward_path_counts`` counts the
  outcomes.

Without grad mode (evaluation, ``forward_only``) only GEMM 1 and the statistics run: no gradient is
computed or stored. Extra memory held from forward to backward: one hidden-gradient tensor per head
(the size of that head's hidden states, which become the returned hidden gradients) and, only when the
weight gradient is returned rather than put in ``main_grad``, ``G`` (``V/tp x h``, the weight's dtype).
Under megatron DDP the weight-shaped placeholder gradient megatron's contract makes the op return is a
view of ``main_grad``'s memory (DDP's hook skips it unread and drops it; see
``mcore_internals.wgrad_placeholder``), so it costs nothing. The op saves ``hidden`` and ``weight``, as
megatron's output layer does. During the forward it holds one logits tile (``ce_chunks.TILE_BYTES``, at least
2,048 rows on a GPU), for 16-bit weights without ``main_grad`` an fp32 G accumulator, and on the CPU
reference path one chunk's hidden rows scaled by ``q`` (``[rows, h]``).

Tensor parallelism: ``tp_group`` is the tensor-parallel process group (None or size 1: no
communication). ``hidden`` must be the full sequence replicated on the TP ranks (as megatron's output
layer input after its sequence-parallel gather). The gradient returned for ``hidden`` is this vocab
shard's partial, exactly what megatron's ``ColumnParallelLinear`` computes before its input-grad
all-reduce; so the caller wraps the input as megatron does::

    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)        # SP off
    # or: hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)  # SP on
    loss = fused_linear_cross_entropy(hidden, output_layer.weight, labels, tp_group=tp_group)

``accumulate_into_main_grad=True`` mirrors megatron's ``gradient_accumulation_fusion``: the weight
gradient is added into ``weight.main_grad`` (captured at forward; in the forward, corrected in backward
as above) and the op returns megatron's dummy weight grad (setting ``weight.grad_added_to_main_grad``).
Label smoothing is not supported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from tri_megatron.mcore_internals import wgrad_placeholder
from tri_megatron.ops import ce_backward as back
from tri_megatron.ops import ce_chunks as chunks
from tri_megatron.ops.ce_heads import Heads, Number, acc_dtype, kernel_for, prepare, stat_dtype
from tri_megatron.ops.ce_chunks import default_chunk_size  # noqa: F401  (re-exported)

__all__ = ["fused_linear_cross_entropy", "fused_mtp_cross_entropy", "reference_mtp_cross_entropy",
           "default_chunk_size", "backward_path_counts"]

# How many backward calls took each path. "stored": the forward's gradients rescaled (or, into
# main_grad, already right); "corrected": main_grad got the forward's gradient with a guessed factor,
# the difference added by a recompute; "recomputed": the upstream was not proportional to the expected
# one, weight gradient recomputed. Diagnostics.
backward_path_counts = {"stored": 0, "corrected": 0, "recomputed": 0}


# ------------------------------------------------------------------------ autograd function ----------
class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward: token chunks x full vocab shard -> loss rows and (training) the gradients, three GEMMs
    per chunk. Backward: rescale the stored gradients (or correct / recompute the weight gradient)."""

    @staticmethod
    def forward(ctx, heads: Heads, weight: torch.Tensor, *hiddens: torch.Tensor):
        # One pass over token chunks computing loss and both gradients (the three-GEMM schedule); kept
        # in one function because the chunk loop shares its accumulators and TP statistics across steps.
        ctx.set_materialize_grads(False)  # a head whose loss is unused sends None
        vocab, h = weight.shape
        vocab_start = heads.rank * vocab
        kern = kernel_for(heads, weight)
        sdt = stat_dtype(weight)
        dev = weight.device
        xs = [x.reshape(-1, h) for x in hiddens]
        sizes = [x.shape[0] for x in xs]
        need_w = heads.need_grads and ctx.needs_input_grad[1]
        need_x = [heads.need_grads and ctx.needs_input_grad[2 + k] for k in range(len(xs))]
        grads = need_w or any(need_x)
        chunk = max(1, min(heads.chunk_size or chunks.default_chunk_size(vocab, weight.dtype, max(sizes), grads, dev),
                           max(sizes)))
        buf = torch.empty(chunk * vocab, dtype=weight.dtype, device=dev)
        lse_all = torch.empty(sum(sizes), dtype=sdt, device=dev)
        target_all = torch.empty_like(lse_all)
        gx = [torch.empty_like(x) if nx else None for x, nx in zip(xs, need_x)]
        # Under megatron DDP (main_grad) the weight gradient goes straight into main_grad, scaled by the
        # expected common factor (the last one seen; corrected in backward if the real one differs), so no
        # weight-sized gradient is held from forward to backward. Not inside a backward pass: a forward
        # run there is an activation recompute, which (non-reentrant) is never backwarded itself.
        into_main = need_w and heads.main_grad is not None and not back.in_backward()
        c_guess = back.scale_guess(weight) if into_main else None
        acc = None
        if into_main:
            acc = heads.main_grad
        elif need_w:
            acc = torch.empty(vocab, h, dtype=acc_dtype(weight.dtype), device=dev)
        fresh = need_w and not into_main and acc.dtype == weight.dtype  # else: zero-filled / main_grad
        if need_w and not into_main and not fresh:
            acc.zero_()
        logits = None
        off = 0
        for k, (x, lab) in enumerate(zip(xs, heads.labels)):
            # the tile becomes the gradient for the expected upstream (weights[k] folded in before its one
            # rounding), so G sums over the heads as they are and the hidden gradients need one rescale
            q = heads.coef(k, heads.expect[k]) if grads else None
            for c0 in range(0, x.shape[0], chunk):
                c1 = min(c0 + chunk, x.shape[0])
                logits = torch.mm(x[c0:c1], weight.t(), out=chunks.tile(buf, c1 - c0, vocab))  # GEMM 1
                rows = slice(off + c0, off + c1)
                row_q = None  # the tiles' row factor q, when the GEMM operands carry it instead
                if grads and kern is None and heads.world == 1:  # reference: stats + gradient in one pass
                    if chunks.chunk_loss_grad_ref(logits, lab[c0:c1], vocab_start, q[c0:c1], heads.z_loss,
                                                  lse_all[rows], target_all[rows]):
                        row_q = q[c0:c1, None]
                else:
                    lse, target = chunks.global_lse(kern, heads.world, heads.tp_group, logits, lab[c0:c1],
                                                    vocab_start, sdt)
                    lse_all[rows] = lse
                    target_all[rows] = target
                    if not grads:
                        continue
                    qc = q[c0:c1]
                    p = (qc * (1.0 + 2.0 * heads.z_loss * lse)).contiguous() if heads.z_loss else qc
                    chunks.chunk_grad_inplace(kern, logits, lab[c0:c1], vocab_start, lse.contiguous(), p, qc)
                if need_x[k]:
                    torch.mm(logits, weight, out=gx[k][c0:c1])  # GEMM 2
                    if row_q is not None:
                        gx[k][c0:c1].mul_(row_q)
                if need_w:
                    xc = x[c0:c1] if row_q is None else x[c0:c1] * row_q
                    if fresh:  # the first chunk writes the accumulator (no zero-fill, no read)
                        torch.mm(logits.t(), xc, out=acc)
                        fresh = False
                    else:  # into main_grad: times the factor expected from the upstream
                        chunks.accumulate_mm(acc, logits.t(), xc, c_guess if into_main else 1.0)  # GEMM 3
            off += x.shape[0]
        del buf, logits
        loss = lse_all - target_all
        if heads.z_loss:
            loss = loss + heads.z_loss * lse_all * lse_all
        outs = []
        for hid, valid, sc, part in zip(hiddens, heads.valid, heads.scales, loss.split(sizes)):
            outs.append((part * valid * sc).view(hid.shape[0], hid.shape[1]).t().contiguous())
        if grads:
            ctx.grad_w = None
            if need_w and not into_main:  # held to backward: in main_grad's dtype, else the weight's
                hold = heads.main_grad.dtype if heads.main_grad is not None else weight.dtype
                ctx.grad_w = acc if acc.dtype == hold else acc.to(hold)
            del acc
            ctx.in_main_grad = c_guess  # main_grad already holds c_guess * G (G = sum_k w_k G_k)
            ctx.grad_x = gx
            ctx.lse = lse_all
            ctx.save_for_backward(weight, *hiddens)
        ctx.heads, ctx.sizes, ctx.grads = heads, sizes, grads
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_losses):
        # Three outcomes for the weight gradient (stored and rescaled, already in main_grad and perhaps
        # corrected, recomputed) share the hidden-gradient rescale and megatron's placeholder contract.
        heads, sizes = ctx.heads, ctx.sizes
        n_heads = len(sizes)
        if not ctx.grads:
            raise RuntimeError("fused cross-entropy: backward through a forward that ran without grad mode")
        weight, *hiddens = ctx.saved_tensors
        # the stored gradients are rescaled in place and handed out once; a second backward through
        # the same graph (retain_graph) recomputes
        gx, grad_w_stored, ctx.grad_x, ctx.grad_w = ctx.grad_x, ctx.grad_w, None, None
        in_main, ctx.in_main_grad = ctx.in_main_grad, None
        # per token, the upstream gradient in the op's [s * b] row order (None: head unused)
        ups = [None if g is None else g.t().reshape(-1).to(ctx.lse.dtype) for g in grad_losses]
        need_x = [ctx.needs_input_grad[2 + k] and ups[k] is not None for k in range(n_heads)]
        need_w = ctx.needs_input_grad[1] and any(u is not None for u in ups)
        main_grad = heads.main_grad

        c, same, lost = back.verdict(heads, ups, in_main)  # one host sync
        grads_h: List[Optional[torch.Tensor]] = [None] * n_heads
        if gx is not None:
            for k in range(n_heads):
                if need_x[k] and gx[k] is not None and not lost[k]:
                    e = heads.expect[k]
                    factor = torch.where(e != 0, ups[k] / torch.where(e != 0, e, torch.ones_like(e)),
                                         torch.zeros_like(e))
                    grads_h[k] = gx[k].mul_(factor[:, None]).view(hiddens[k].shape)
                    need_x[k] = False
            del gx
        grad_w = None
        dummy_storage = None
        produced_w = need_w  # a weight gradient exists (in main_grad, or returned)
        if in_main is not None:  # main_grad holds c' * G: add what the real upstream adds
            if c is not None:
                back.remember_scale(weight, c)
            if same:
                backward_path_counts["stored"] += 1
            else:  # add the difference: (c - c') G for megatron's upstream (the forward's tiles again, so
                # the two parts round alike), the gradient of upstream - c' * expected for any other
                backward_path_counts["corrected"] += 1
                no_x = [False] * n_heads
                if c is not None:
                    back.recompute(heads, weight, hiddens, heads.expect, ctx.lse, sizes, no_x, True, alpha=c - in_main)
                else:
                    residual = [(u if u is not None else 0.0) - in_main * e for u, e in zip(ups, heads.expect)]
                    back.recompute(heads, weight, hiddens, residual, ctx.lse, sizes, no_x, True)
            need_w, produced_w = False, True
            dummy_storage = main_grad  # the placeholder may alias it: DDP's hook does not read it
        elif grad_w_stored is not None and need_w and c is not None:
            backward_path_counts["stored"] += 1
            back.remember_scale(weight, c)
            need_w = False
            if main_grad is None:
                grad_w = grad_w_stored.mul_(c)
            else:  # held in main_grad's dtype; its storage becomes megatron's dummy weight grad
                main_grad.add_(grad_w_stored, alpha=c)
                dummy_storage = grad_w_stored
        del grad_w_stored  # before anything weight-sized is allocated
        if need_w or any(need_x):
            backward_path_counts["recomputed"] += 1
            grad_x_re, grad_w_re = back.recompute(heads, weight, hiddens, ups, ctx.lse, sizes, need_x, need_w)
            for k in range(n_heads):
                if grad_x_re[k] is not None:
                    grads_h[k] = grad_x_re[k].view(hiddens[k].shape)
            if grad_w_re is not None:
                grad_w = grad_w_re
        if produced_w and main_grad is not None:
            grad_w = wgrad_placeholder(weight, dummy_storage)  # megatron DDP's dummy grad
        return (None, grad_w, *grads_h)


# ------------------------------------------------------------------------ public API -----------------
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
    upstream_weights: Optional[Sequence[Number]] = None,
    accumulate_into_main_grad: bool = False,
    _use_kernels: bool = True,
) -> List[torch.Tensor]:
    """Per-token losses ``[b, s]`` of every head (main + MTP heads) in one autograd op.

    ``upstream_weights[k]`` (float or 0-dim tensor, default 1): head k's share of the upstream
    gradient the caller will send, which is expected to be ``c * upstream_weights[k] * loss_mask_k``
    per token for one scalar c unknown until backward (e.g. ``1 / num_tokens`` for a masked mean).
    Any other upstream is still exact, at the cost of recomputing the weight gradient."""
    if len(hiddens) == 0:
        return []
    heads = prepare(hiddens, weight, labels_list, loss_masks, ignore_index, tp_group, chunk_size,
                     z_loss_weight, scales, upstream_weights, accumulate_into_main_grad, _use_kernels)
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
    upstream_weight: Number = 1.0,
    accumulate_into_main_grad: bool = False,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of one head (see the module docstring)."""
    return fused_mtp_cross_entropy([hidden], weight, [labels], loss_masks=[loss_mask],
                                   ignore_index=ignore_index, tp_group=tp_group, chunk_size=chunk_size,
                                   z_loss_weight=z_loss_weight, scales=[scale],
                                   upstream_weights=[upstream_weight],
                                   accumulate_into_main_grad=accumulate_into_main_grad)[0]


def reference_mtp_cross_entropy(hiddens, weight, labels_list, **kwargs) -> List[torch.Tensor]:
    """:func:`fused_mtp_cross_entropy` on the PyTorch reference path on any device (kernel oracle)."""
    return fused_mtp_cross_entropy(hiddens, weight, labels_list, _use_kernels=False, **kwargs)
