"""Position-dependent query scaling of one attention layer, applied to q before the core attention.

Two forms, both a per-query factor, so they fold into q and leave any flash kernel stock:

* SSMax (Scalable-Softmax, arXiv 2501.19399): logits of query i are multiplied by s_h * log(n_i),
  n_i = number of keys query i sees (i + 1 under a causal mask, counted within its document for
  packed sequences); s_h is learnable per layer and head.
* Temperature tuning (Llama 4 / Tri-70B as released, NoPE layers only):
  q *= log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1, pos 0-based.

``QueryScaling`` holds the settings and SSMax's parameter; the arithmetic is
``tri_megatron.ops.apply_rope_and_query_scale`` (fused with RoPE: CUDA kernel on GPU, PyTorch
reference elsewhere).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tri_megatron.ops import apply_rope_and_query_scale


class QueryScaling(torch.nn.Module):
    """Settings and SSMax's learnable per-head s (this TP rank's heads) of one attention layer."""

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

    def op_kwargs(self) -> dict:
        return {"mode": self.mode, "ssmax_scale": getattr(self, "ssmax_scale", None),
                "floor_scale": self.floor_scale, "attn_scale": self.attn_scale}

    def forward(self, query: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scale only (no RoPE). query: [s, b, h, d] (sbhd) or [t, h, d] (thd with cu_seqlens)."""
        q, _ = apply_rope_and_query_scale(query, None, None, apply_rope=False, cu_seqlens=cu_seqlens,
                                          **self.op_kwargs())
        return q


def default_ssmax_init(seq_length: int) -> float:
    """s such that s*log(n) = 1 at the full training context: attention at the trained length starts
    exactly as standard softmax and sharpens with learning."""
    return 1.0 / math.log(max(seq_length, 2))
