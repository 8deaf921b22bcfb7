"""Position-dependent query scaling, applied to q (after RoPE) before the core attention kernel.

Two forms, both a per-query factor, so they fold into q and leave any flash kernel stock:

* SSMax (Scalable-Softmax, arXiv 2501.19399): logits of query i are multiplied by s_h * log(n_i),
  n_i = number of keys query i sees (i + 1 under a causal mask, counted within its document for
  packed sequences); s_h is learnable per layer and head.
* Temperature tuning (Llama 4 / Tri-70B as released, NoPE layers only):
  q *= log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1, pos 0-based.

These PyTorch functions are the reference; ``tri_megatron.ops`` holds the fused kernel path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def positions_in_document(seq_len: int, device, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based position of each token within its document ([seq_len] long)."""
    pos = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens[:-1].to(device=device, dtype=torch.long)
    doc = torch.bucketize(pos, cu_seqlens[1:].to(device=device, dtype=torch.long), right=True)
    return pos - starts[doc]


def ssmax_log_n(positions: torch.Tensor) -> torch.Tensor:
    """log(n) with n = keys seen = position + 1 (fp32)."""
    return torch.log1p(positions.float())


def temperature_tuning_factor(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama-4 / Tri-70B query temperature: log(floor((pos+1)/floor_scale)+1)*attn_scale+1 (fp32)."""
    return torch.log(torch.floor((positions.float() + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0


class QueryScaling(torch.nn.Module):
    """Scales q of one attention layer; holds SSMax's learnable per-head s (this TP rank's heads)."""

    def __init__(self, mode: str, num_heads_local: int, *, ssmax_init: float = 1.0,
                 floor_scale: float = 8192.0, attn_scale: float = 0.1):
        super().__init__()
        assert mode in ("ssmax", "temperature"), mode
        self.mode = mode
        self.floor_scale = floor_scale
        self.attn_scale = attn_scale
        if mode == "ssmax":
            self.ssmax_scale = torch.nn.Parameter(torch.full((num_heads_local,), float(ssmax_init)))
            # megatron's TP attributes: sharded along heads like the QKV projection.
            self.ssmax_scale.tensor_model_parallel = True
            self.ssmax_scale.partition_dim = 0
            self.ssmax_scale.partition_stride = 1

    def factor(self, seq_len: int, device, cu_seqlens=None) -> torch.Tensor:
        """[seq_len, heads or 1] fp32 factor."""
        pos = positions_in_document(seq_len, device, cu_seqlens)
        if self.mode == "ssmax":
            return ssmax_log_n(pos)[:, None] * self.ssmax_scale.float()[None, :]
        return temperature_tuning_factor(pos, self.floor_scale, self.attn_scale)[:, None]

    def forward(self, query: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query: [s, b, h, d] (sbhd) or [t, h, d] (thd with cu_seqlens)."""
        f = self.factor(query.shape[0], query.device, cu_seqlens)
        if query.dim() == 4:
            f = f[:, None, :, None]
        else:
            f = f[:, :, None]
        return (query.float() * f).to(query.dtype)


def default_ssmax_init(seq_length: int) -> float:
    """s such that s*log(n) = 1 at the full training context: attention at the trained length starts
    exactly as standard softmax and sharpens with learning."""
    return 1.0 / math.log(max(seq_length, 2))
