"""The RMSNorm of the local (non-Transformer-Engine) layer spec, which accepts sequence parallelism.

megatron-core's torch norm factory (``WrappedTorchNorm``) refuses ``sequence_parallel``, so without
Transformer Engine a run could not use it, and the model's sequence-parallel code paths (embedding
scatter, the MTP block, the fused loss's gather) could not be tested on a machine without TE. A norm
needs nothing new for it: it acts on each token alone, so it runs unchanged on a rank's 1/TP of the
sequence. Its weight is replicated over the tensor-parallel ranks, and each rank's gradient covers only
that rank's tokens; the ``sequence_parallel`` attribute asks megatron's ``finalize_model_grads`` to
all-reduce it over TP, as Transformer Engine's norms do. The module is a plain ``torch.nn.RMSNorm``
otherwise (same parameter name and state dict), so checkpoints and HF conversion do not change.
"""

from __future__ import annotations

import torch


class TriRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built as megatron builds norms (``config``, ``hidden_size``, ``eps``), with its
    weight marked for the TP all-reduce of sequence-parallel gradients when the run uses it."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_norm_kwargs):
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"TriRMSNorm builds RMSNorm, not {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
