"""Packed samples: per-document positions, loss mask and boundaries, and the THD layout of a micro-batch.

A sample is ``seq_length`` tokens cut from EOD-delimited documents. As megatron-core's GPTDataset
(``_get_ltor_masks_and_position_ids``), a document starts at position 0 and right after every EOD
token; the EOD itself ends the document before it.

    document_starts(tokens, eod)        bool [..., s]: True where a document starts
    reset_position_ids(tokens, eod)     int64 [..., s]: position within the document
    eod_loss_mask(tokens, eod)          float [..., s]: 0 where the input token is EOD
    document_boundaries(tokens, eod)    (cu_seqlens int32 [n+1], max_seqlen) of a micro-batch [b, s]
                                        laid out sample after sample (a sample start is a boundary too)
    add_boundaries(batch, eod)          the micro-batch dict with "cu_seqlens" / "max_seqlen" (host side)
    to_thd(batch)                       [b, s] fields -> [1, b*s] (the THD token order)
    packed_seq_params(cu, max_seqlen)   megatron-core's PackedSeqParams(qkv_format="thd")

Boundaries are computed on the host when the micro-batch is collated, so neither the model nor the
device needs a sync to learn them; ``max_seqlen`` is a Python int (Transformer Engine and the local
attention size their work by it).
"""
from __future__ import annotations

from typing import Tuple

import torch


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    starts = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    starts[..., 0] = True
    starts[..., 1:] = tokens[..., :-1] == eod
    return starts


def reset_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    idx = torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
    start_of = torch.where(document_starts(tokens, eod), idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return (idx - start_of).contiguous()


def eod_loss_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    return (tokens != eod).float()


def document_boundaries(tokens: torch.Tensor, eod: int) -> Tuple[torch.Tensor, int]:
    """cu_seqlens over the micro-batch's b*s tokens in sample-major order, and the longest document."""
    flat = document_starts(tokens, eod).reshape(-1)
    starts = torch.nonzero(flat).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=starts.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def add_boundaries(batch: dict, eod: int) -> dict:
    """Adds the micro-batch's document boundaries (computed from its tokens on the host)."""
    cu, max_seqlen = document_boundaries(batch["tokens"], eod)
    batch["cu_seqlens"], batch["max_seqlen"] = cu, max_seqlen
    return batch


THD_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def to_thd(batch: dict) -> dict:
    """The [b, s] token fields as one [1, b*s] packed sequence (the order cu_seqlens counts in)."""
    out = dict(batch)
    for key in THD_FIELDS:
        if key in out and torch.is_tensor(out[key]):
            out[key] = out[key].reshape(1, -1)
    return out


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))
