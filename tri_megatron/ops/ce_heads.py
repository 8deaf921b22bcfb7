"""Per-call state of the fused cross-entropy (``tri_megatron.ops.fused_cross_entropy``): the argument
checks, each head's labels / loss mask / expected upstream flattened to the op's ``[s * b]`` row order,
the tensor-parallel rank and size, and the dtypes and kernel choice that follow from the weight.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist

from tri_megatron.mcore_internals import main_grad as ddp_main_grad
from tri_megatron.ops._kernels import use_kernels_for

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Number = Union[float, torch.Tensor]


def tp_info(tp_group) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group; (0, 1) without one."""
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


class Heads:
    """Non-differentiable per-call state: flattened labels / masks per head, TP info, settings.

    ``valid[k]``: 1 on tokens with a loss (label not ignored, mask != 0); ``upstream[k]``: the loss-mask
    value there (0 elsewhere), the per-token shape of the expected upstream gradient; ``weights[k]``:
    the per-head factor of the expected upstream (float or 0-dim tensor); ``expect[k]``: their product,
    the upstream gradient of head k's per-token loss the forward computes the gradients for (the real
    one is expected to be c times it)."""

    def __init__(self, labels, valid, upstream, scales, weights, rank, world, tp_group, chunk_size,
                 z_loss, use_kernels, main_grad, need_grads):
        self.labels, self.valid, self.upstream = labels, valid, upstream
        self.scales, self.weights = scales, weights
        self.rank, self.world, self.tp_group = rank, world, tp_group
        self.chunk_size, self.z_loss = chunk_size, z_loss
        self.use_kernels, self.main_grad, self.need_grads = use_kernels, main_grad, need_grads
        self.expect = [u * w for u, w in zip(upstream, weights)]

    def coef(self, k: int, upstream: torch.Tensor) -> torch.Tensor:
        """Per-token factor of head k's tile (softmax - onehot) for a given upstream of its loss."""
        return (upstream * self.valid[k] * self.scales[k]).contiguous()


def kernel_for(heads: Heads, weight: torch.Tensor):
    if not heads.use_kernels or weight.dtype not in KERNEL_DTYPES:
        return None
    return use_kernels_for(weight)


def stat_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def prepare(hiddens, weight, labels_list, loss_masks, ignore_index, tp_group, chunk_size, z_loss_weight,
            scales, upstream_weights, accumulate_into_main_grad, use_kernels) -> Heads:
    """Check the arguments of ``fused_mtp_cross_entropy`` (ValueError naming the bad one) and build the
    per-call state."""
    if len(hiddens) != len(labels_list):
        raise ValueError(f"{len(hiddens)} hidden states but {len(labels_list)} label tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab/tp, hidden], got {tuple(weight.shape)}")
    n = len(hiddens)
    loss_masks = list(loss_masks) if loss_masks is not None else [None] * n
    scales = list(scales) if scales is not None else [1.0] * n
    upstream_weights = list(upstream_weights) if upstream_weights is not None else [1.0] * n
    if len(loss_masks) != n or len(scales) != n or len(upstream_weights) != n:
        raise ValueError("loss_masks, scales and upstream_weights need one entry per head")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    main_grad = None
    if accumulate_into_main_grad:
        main_grad = ddp_main_grad(weight)
        if main_grad is None or tuple(main_grad.shape) != tuple(weight.shape):
            raise ValueError("accumulate_into_main_grad needs weight.main_grad shaped like weight")
    rank, world = tp_info(tp_group)
    sdt = stat_dtype(weight)
    labels, valid, upstream, weights = [], [], [], []
    for x, lab, mask, w in zip(hiddens, labels_list, loss_masks, upstream_weights):
        if x.dim() != 3 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden must be [s, b, {weight.shape[1]}], got {tuple(x.shape)}")
        if x.dtype != weight.dtype:
            raise ValueError(f"hidden dtype {x.dtype} differs from weight dtype {weight.dtype}")
        if tuple(lab.shape) != (x.shape[1], x.shape[0]):
            raise ValueError(f"labels must be [b, s] = {(x.shape[1], x.shape[0])}, got {tuple(lab.shape)}")
        lab_sb = lab.t().reshape(-1).to(device=weight.device, dtype=torch.long).contiguous()
        ok = lab_sb != ignore_index
        up = ok.to(sdt)
        if mask is not None:
            if tuple(mask.shape) != tuple(lab.shape):
                raise ValueError(f"loss_mask must be [b, s] like labels, got {tuple(mask.shape)}")
            m = mask.t().reshape(-1).to(device=weight.device, dtype=sdt)
            ok = ok & (m != 0)
            up = torch.where(ok, m, torch.zeros_like(m))
        labels.append(lab_sb)
        valid.append(ok.to(sdt))
        upstream.append(up.contiguous())
        weights.append(w.to(device=weight.device, dtype=sdt) if isinstance(w, torch.Tensor) else float(w))
    need_grads = torch.is_grad_enabled() and (weight.requires_grad or any(x.requires_grad for x in hiddens))
    return Heads(labels, valid, upstream, [float(s) for s in scales], weights, rank, world, tp_group,
                  chunk_size, float(z_loss_weight), use_kernels, main_grad, need_grads)
