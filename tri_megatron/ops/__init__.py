"""Autograd ops: each dispatches to its csrc kernel on CUDA and to its PyTorch reference otherwise.

* :mod:`tri_megatron.ops.fused_cross_entropy` -- output layer + vocab-parallel softmax cross-entropy
  for the main and MTP heads in token chunks (``fused_linear_cross_entropy``,
  ``fused_mtp_cross_entropy``); its per-chunk primitives (tile sizing, row statistics, in-place
  gradient, TP merge) in :mod:`tri_megatron.ops.ce_chunks`, its per-call state and argument checks
  in :mod:`tri_megatron.ops.ce_heads`, its backward-side helpers (upstream check, remembered scale,
  exact recompute) in :mod:`tri_megatron.ops.ce_backward`.
* :mod:`tri_megatron.ops.rope_ssmax` -- RoPE on q / k fused with the per-query SSMax or temperature
  factor (``apply_rope_and_query_scale``, ``query_scale_factor``).
* :mod:`tri_megatron.ops._kernels` -- loads ``tri_megatron._cuda_kernels`` (built by setup.py, or JIT);
  ``kernels_available()`` tells whether the CUDA path is on.
"""

from tri_megatron.ops._kernels import kernels_available
from tri_megatron.ops.fused_cross_entropy import fused_linear_cross_entropy, fused_mtp_cross_entropy
from tri_megatron.ops.rope_ssmax import apply_rope_and_query_scale, query_scale_factor

__all__ = [
    "apply_rope_and_query_scale",
    "fused_linear_cross_entropy",
    "fused_mtp_cross_entropy",
    "kernels_available",
    "query_scale_factor",
]
