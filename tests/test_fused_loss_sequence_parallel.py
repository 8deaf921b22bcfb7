"""The fused output-layer loss (``fused_mtp_cross_entropy``) under sequence parallelism, at TP=2 under gloo.

Two spawned processes initialise megatron-core's parallel state with tensor-model-parallel size 2 and
run exactly the call pattern of ``FusedLossGPTModel._postprocess`` with ``sequence_parallel``: each
rank holds the sequence shard ``[s/2, b, h]`` of every head's hidden states, passes it through
megatron's ``gather_from_sequence_parallel_region`` (backward: reduce-scatter) and calls the op on its
vocab shard of the output weight with megatron's TP group and ``accumulate_into_main_grad`` (the weight
carries a megatron-DDP ``main_grad`` and ``grad_added_to_main_grad``, and megatron DDP's grad-accumulator
hook: add ``grad`` into ``main_grad`` unless already added, drop ``grad``). float64, main head + MTP heads,
loss masks with zeros, ignored labels, z-loss, MTP scales, megatron-style upstream gradients with a
common factor c != 1 (the gradients the op computed in forward are rescaled in backward).

Oracles:
* a plain single-process PyTorch computation on the full sequence and the full vocabulary (full logits
  + ``F.cross_entropy``, autograd): per-token losses on every rank, each rank's sequence-shard hidden
  gradient (rows of the oracle's; the gather's reduce-scatter must complete the op's vocab-shard
  partials, which alone differ from the oracle), each rank's ``main_grad`` (its vocab-shard rows of the
  oracle's weight gradient);
* megatron's own unfused SP path on the same shards: ``gather_from_sequence_parallel_region``, the
  ``ColumnParallelLinear`` GEMM, ``vocab_parallel_cross_entropy`` (z-loss term from the logsumexp of
  the logits gathered with ``gather_from_tensor_model_parallel_region``): same losses and gradients,
  both paths in float32 (megatron's vocab-parallel CE computes in fp32 whatever its input dtype);
* two micro-batches accumulated into ``main_grad`` (same c and different c): the sum of the oracle's
  weight gradients.
"""

import os

import torch
import torch.nn.functional as F

from tri_megatron.local_dist import free_port

IGNORE = -100
S, B, H, V, TP = 8, 2, 6, 14, 2
TOL = dict(rtol=1e-10, atol=1e-12)  # float64
TOL32 = dict(rtol=2e-5, atol=1e-6)  # float32


def _problem(heads, seed):
    """Full-sequence hidden states [S, B, H] per head, the full weight [V, H], labels / masks [B, S]
    (float64)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(S, B, H, generator=g, dtype=torch.float64) for _ in range(heads)]
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    labels, masks = [], []
    for i in range(heads):
        lab = torch.randint(0, V, (B, S), generator=g)
        lab[0, 1 + i] = IGNORE  # an ignored token in the first sequence shard ...
        lab[1, S // 2 + 1] = IGNORE  # ... and one in the second
        m = (torch.rand(B, S, generator=g) > 0.25).to(torch.float64)
        m[:, S - i:] = 0  # MTP-style rolled masks: head i drops its last i tokens
        m[1, 2] = 0.5  # a fractional loss-mask weight
        labels.append(lab)
        masks.append(m)
    return xs, w, labels, masks


def _naive(xs, w, labels, masks, scales, z):
    """Single-process full-sequence, full-vocab per-token losses [B, S] (0 where masked / ignored)."""
    out = []
    for x, lab, mask, sc in zip(xs, labels, masks, scales):
        logits = torch.einsum("sbh,vh->bsv", x, w)
        ce = F.cross_entropy(logits.reshape(-1, V), lab.reshape(-1), reduction="none",
                             ignore_index=IGNORE).view_as(lab)
        lse = torch.logsumexp(logits, dim=-1)
        keep = (lab != IGNORE) & (mask != 0)
        out.append(torch.where(keep, ce + z * lse * lse, torch.zeros_like(ce)) * sc)
    return out


def _megatron_upstream(masks, c):
    """What megatron's schedule sends each head's per-token loss: mask / token count (the MTP scale is
    the op's ``scales``), times one common factor c. Returns (upstream tensors, upstream_weights)."""
    weights = [1.0 / m.sum() for m in masks]
    return [c * wt * m for wt, m in zip(weights, masks)], weights


def _oracle(xs, w, labels, masks, scales, z, upstream):
    xs = [x.clone().requires_grad_() for x in xs]
    w = w.clone().requires_grad_()
    losses = _naive(xs, w, labels, masks, scales, z)
    sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
    return [l.detach() for l in losses], [x.grad for x in xs], w.grad


def _shards(xs, w, rank):
    sl, vl = S // TP, V // TP
    return [x[rank * sl:(rank + 1) * sl].clone().requires_grad_() for x in xs], \
        w[rank * vl:(rank + 1) * vl].clone().requires_grad_()


def _ddp_backward_post_hook(param):
    """What megatron DDP's hook on the parameter's grad accumulator does (``_make_backward_post_hook``):
    add ``param.grad`` into ``main_grad`` unless the layer already did, then drop ``param.grad``."""
    if param.grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
        param.main_grad.add_(param.grad.data)
    param.grad = None


def _fused_sp(xs, w, labels, masks, scales, z, weights, rank, chunk, w_shard=None):
    """The model's SP call pattern on this rank's shards. Returns (losses, x shards, gathered, w shard)."""
    from megatron.core import parallel_state, tensor_parallel

    from tri_megatron.ops.fused_cross_entropy import fused_mtp_cross_entropy

    x_shards, w_new = _shards(xs, w, rank)
    if w_shard is None:  # a megatron-DDP parameter: main_grad buffer, hook flag, grad-accumulation hook
        w_shard = w_new
        w_shard.main_grad = torch.zeros_like(w_shard)
        w_shard.grad_added_to_main_grad = False  # megatron resets it once per step (zero_grad_buffer)
        w_shard.register_post_accumulate_grad_hook(_ddp_backward_post_hook)
    gathered = [tensor_parallel.gather_from_sequence_parallel_region(x) for x in x_shards]
    for g in gathered:
        g.retain_grad()
    losses = fused_mtp_cross_entropy(gathered, w_shard, labels, loss_masks=masks,
                                     tp_group=parallel_state.get_tensor_model_parallel_group(),
                                     chunk_size=chunk, z_loss_weight=z, scales=scales,
                                     upstream_weights=weights, accumulate_into_main_grad=True)
    return losses, x_shards, gathered, w_shard


def _megatron_unfused_sp(xs, w, labels, masks, scales, z, rank):
    """megatron's unfused SP output layer + vocab-parallel CE on the same shards (z-loss added from the
    logsumexp of the TP-gathered logits). Returns (losses [B, S], x shards, w shard)."""
    from megatron.core import tensor_parallel

    x_shards, w_shard = _shards(xs, w, rank)
    losses = []
    for x, lab, mask, sc in zip(x_shards, labels, masks, scales):
        logits = torch.matmul(tensor_parallel.gather_from_sequence_parallel_region(x), w_shard.t())  # [S, B, V/tp]
        lse = torch.logsumexp(tensor_parallel.gather_from_tensor_model_parallel_region(logits), dim=-1)
        # after the lse: for fp32 logits megatron's CE subtracts the row max from them in place
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits, lab.t().contiguous())  # [S, B]
        keep = ((lab != IGNORE) & (mask != 0)).to(logits.dtype)
        losses.append((ce + z * lse * lse).t() * keep * sc)
    return losses, x_shards, w_shard


def _init(rank, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    from megatron.core import parallel_state

    from tri_megatron import compat

    compat.activate()  # megatron's mappings allocate on "cuda": the CPU shim
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=1)
    assert parallel_state.get_tensor_model_parallel_world_size() == TP
    assert parallel_state.get_tensor_model_parallel_rank() == rank


def _finish():
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _single_microbatch_worker(rank, port, depth, chunk):
    import torch.distributed as dist

    _init(rank, port)
    try:
        from megatron.core import parallel_state

        sl, vl = S // TP, V // TP
        rows, vrows = slice(rank * sl, (rank + 1) * sl), slice(rank * vl, (rank + 1) * vl)
        xs, w, labels, masks = _problem(1 + depth, seed=11 + depth)
        scales, z = [1.0] + [0.3 / depth] * depth, 1e-2
        upstream, weights = _megatron_upstream(masks, c=48.0)
        ref_losses, ref_xgrads, ref_wgrad = _oracle(xs, w, labels, masks, scales, z, upstream)

        # fused, sequence parallel
        losses, x_shards, gathered, w_shard = _fused_sp(xs, w, labels, masks, scales, z, weights, rank, chunk)
        for l, r in zip(losses, ref_losses):
            torch.testing.assert_close(l.detach(), r, **TOL)
            other = [torch.empty_like(l) for _ in range(TP)]
            dist.all_gather(other, l.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            torch.testing.assert_close(other[0], other[1], **TOL)  # the same losses on both TP ranks
        sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
        assert w_shard.grad_added_to_main_grad
        torch.testing.assert_close(w_shard.main_grad, ref_wgrad[vrows], **TOL)
        for x, g, ref in zip(x_shards, gathered, ref_xgrads):
            # the op's gradient for the gathered (full-sequence) input is this vocab shard's partial ...
            assert not torch.allclose(g.grad, ref, rtol=1e-6, atol=1e-8)
            # ... and the gather's backward (reduce-scatter) completes it for this rank's sequence rows
            torch.testing.assert_close(x.grad, ref[rows], **TOL)

        # megatron's unfused SP path on the same shards: same losses and gradients. Its vocab-parallel CE
        # computes in fp32 whatever the logits' dtype, so this comparison runs both paths in fp32.
        xs32, w32 = [x.float() for x in xs], w.float()
        up32, weights32 = _megatron_upstream([m.float() for m in masks], c=48.0)
        masks32 = [m.float() for m in masks]
        losses, x_shards, _, w_shard = _fused_sp(xs32, w32, labels, masks32, scales, z, weights32, rank, chunk)
        m_losses, m_x, m_w = _megatron_unfused_sp(xs32, w32, labels, masks32, scales, z, rank)
        for l, ml, r in zip(losses, m_losses, ref_losses):
            torch.testing.assert_close(l.detach(), ml.detach(), **TOL32)
            torch.testing.assert_close(ml.detach().double(), r, **TOL32)
        sum((l * u).sum() for l, u in zip(losses, up32)).backward()
        sum((l * u).sum() for l, u in zip(m_losses, up32)).backward()
        torch.testing.assert_close(w_shard.main_grad, m_w.grad, **TOL32)
        torch.testing.assert_close(m_w.grad.double(), ref_wgrad[vrows], **TOL32)
        for x, mx, ref in zip(x_shards, m_x, ref_xgrads):
            torch.testing.assert_close(x.grad, mx.grad, **TOL32)
            torch.testing.assert_close(mx.grad.double(), ref[rows], **TOL32)
    finally:
        _finish()


def _accumulation_worker(rank, port):
    _init(rank, port)
    try:
        sl, vl = S // TP, V // TP
        rows, vrows = slice(rank * sl, (rank + 1) * sl), slice(rank * vl, (rank + 1) * vl)
        scales, z = [1.0, 0.1], 5e-3
        micro = [_problem(2, seed=seed) for seed in (21, 22)]
        w = micro[0][1]  # one shared weight across the micro-batches
        for cs in ((16.0, 16.0), (16.0, 0.125)):  # same c, different c (loss scale changed in between)
            w_shard, expected = None, torch.zeros(V, H, dtype=torch.float64)
            for (xs, _, labels, masks), c in zip(micro, cs):
                upstream, weights = _megatron_upstream(masks, c)
                _, ref_xgrads, ref_wgrad = _oracle(xs, w, labels, masks, scales, z, upstream)
                expected += ref_wgrad
                losses, x_shards, _, w_shard = _fused_sp(xs, w, labels, masks, scales, z, weights, rank,
                                                         chunk=3, w_shard=w_shard)
                sum((l * u).sum() for l, u in zip(losses, upstream)).backward()
                assert w_shard.grad_added_to_main_grad
                for x, ref in zip(x_shards, ref_xgrads):
                    torch.testing.assert_close(x.grad, ref[rows], **TOL)
            torch.testing.assert_close(w_shard.main_grad, expected[vrows], **TOL)
    finally:
        _finish()


def test_sequence_parallel_tp2_matches_single_process_and_megatron_unfused():
    """Main + 2 MTP heads, token chunks straddling the sequence-shard boundary (chunk 5 of 16 rows):
    losses, sequence-shard hidden gradients and main_grad equal the full single-process computation
    and megatron's unfused SP path."""
    import torch.multiprocessing as mp

    mp.spawn(_single_microbatch_worker, args=(free_port(), 2, 5), nprocs=TP, join=True)


def test_sequence_parallel_tp2_two_microbatches_accumulate_into_main_grad():
    """Main + 1 MTP head, two micro-batches into one main_grad with the same and with different common
    factors c: main_grad is the sum of the oracle's weight gradients, hidden gradients per micro-batch."""
    import torch.multiprocessing as mp

    mp.spawn(_accumulation_worker, args=(free_port(),), nprocs=TP, join=True)
