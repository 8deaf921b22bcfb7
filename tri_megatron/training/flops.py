"""FLOP accounting for the Tri architecture, in Megatron-LM's convention unless told otherwise.

Conventions (say which one a figure uses):

* **Model FLOPs** (MFU) count what the model needs, once: 2 FLOPs per multiply-add and 3 passes
  (forward; backward = data gradient + weight gradient = 2x forward) over every GEMM: QKV
  projections with GQA (``h * (n_q + 2 n_kv) * d``), core attention QK^T and AV, the output
  projection, the SwiGLU FFN (``3 h f``), the output layer once per head (main + each MTP depth),
  and each MTP module as an extra transformer layer plus its ``2h -> h`` projection and the
  ``3h`` norm term Megatron-LM adds. Logits use the padded vocabulary (multiple of 128, as the
  model is built). Norms, RoPE, softmax and other elementwise work are not counted (nor by
  Megatron).
* **Causal attention** ("causal", the default, Megatron-LM's ``num_floating_point_operations``):
  a query attends on average ``s/2`` keys. PaLM / torchtitan count the full ``s x s`` score matrix
  ("full"), so their MFU reads higher for the same run (by the attention share of the FLOPs).
* **Sliding windows** (``--window-size w``, Tri-70B's RoPE layers): a window layer is counted with
  ``w (1 - w / 2s)`` keys per query under "causal" (the same continuous approximation that gives
  ``s/2`` for a full causal layer; exactly ``s/2`` at ``w = s``) and ``w`` under "full". Megatron-LM
  itself ignores windows and always counts ``s/2``; for a windowed model it would overstate MFU.
* **Hardware FLOPs** (HFU) add the forward work activation recomputation repeats: ``selective``
  (megatron-core's default ``core_attn``) recomputes core attention in every layer; ``full`` with
  ``uniform`` recomputes every decoder layer and every MTP layer (projection + transformer layer);
  ``full`` with ``block`` recomputes the first ``--recompute-num-layers`` layers of each model
  chunk (``num_layers / (PP * VPP)`` layers) and no MTP layer, as megatron-core does. FlashAttention's
  own recomputation of the score matrix in its backward pass is counted by nobody and not here.

Sanity check (DESIGN.md): Tri-21B at s = 8,192 is 130.6 GFLOP per token by this count.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

ATTENTION_CONVENTIONS = ("causal", "full")

# Dense (no sparsity) bf16 tensor-core peak of one device, TFLOP/s. MFU is always against these.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,  # H100 SXM5 (and H800 / GH200: same SM count and clocks)
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "GH200": 989.0,
    "H200": 989.0,  # H200 SXM: H100's compute with more, faster memory
    "H200 NVL": 835.0,
    "B200": 2250.0,  # HGX B200
    "GB200": 2500.0,
    "A100": 312.0,
    "A800": 312.0,
}


def peak_tflops_for_device(name: str) -> Optional[float]:
    """Dense bf16 peak for a CUDA device name such as ``NVIDIA H100 80GB HBM3``; None if unknown."""
    # longest key first, so that 'H100 PCIe' wins over 'H100' and 'GB200' over 'B200'
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def detect_peak_tflops() -> Optional[float]:
    """Dense bf16 peak of the current CUDA device (None on CPU or for an unknown chip)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_device(torch.cuda.get_device_name())


def padded_vocab_size(vocab_size: int) -> int:
    """The vocabulary the model is built with (tri_megatron.model.config.padded_vocab_size)."""
    return -(-vocab_size // 128) * 128


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The architecture numbers FLOPs depend on."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    seq_length: int
    mtp_num_layers: int = 0
    window_size: Optional[int] = None
    window_attn_skip_freq: Optional[int] = None
    pad_vocab: bool = True

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            kv_channels=args.kv_channels,
            vocab_size=args.vocab_size,
            seq_length=args.seq_length,
            mtp_num_layers=getattr(args, "mtp_num_layers", 0) or 0,
            window_size=getattr(args, "window_size", None) or None,
            window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None) or None,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelShape":
        from tri_megatron.presets import get_preset

        p = get_preset(name).arch
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dataclasses.asdict(p).items() if k in fields}
        values["seq_length"] = p.context_length
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    @property
    def vocab(self) -> int:
        return padded_vocab_size(self.vocab_size) if self.pad_vocab else self.vocab_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.kv_channels

    def is_window_layer(self, layer_number: int) -> bool:
        """megatron-core's rule; layer numbers are 1-based and global, MTP layers are L+1..L+D."""
        if not self.window_size or self.window_size >= self.seq_length:
            return False
        return self.window_attn_skip_freq is None or layer_number % self.window_attn_skip_freq != 0

    def attended_keys(self, layer_number: int, attention: str = "causal") -> float:
        """Keys per query in one layer, averaged over the sequence, under a FLOP convention."""
        s = self.seq_length
        window = self.window_size if self.is_window_layer(layer_number) else None
        if attention == "causal":
            return s / 2.0 if window is None else window * (1.0 - window / (2.0 * s))
        if attention == "full":
            return float(s if window is None else window)
        raise ValueError(f"attention convention {attention!r}: use one of {ATTENTION_CONVENTIONS}")


def layer_forward_flops_per_token(h, f, heads, groups, kv_channels, seq_length, window=None,
                                  attention: str = "causal") -> dict:
    """Forward FLOPs per token of one transformer layer, by GEMM."""
    q = heads * kv_channels
    kv = groups * kv_channels
    shape = ModelShape(1, h, f, heads, groups, kv_channels, 0, seq_length, window_size=window)
    return {
        "qkv": 2 * h * (q + 2 * kv),
        "attention": 2 * 2 * q * shape.attended_keys(1, attention),  # QK^T and AV
        "proj": 2 * q * h,
        "mlp": 2 * 3 * h * f,  # SwiGLU: h -> 2f (gate, up), f -> h
    }


def forward_flops_breakdown(shape: ModelShape, layers: Optional[Iterable[int]] = None, mtp: bool = True,
                            logits: bool = True, attention: str = "causal", tp: int = 1) -> dict:
    """Forward FLOPs per token by component.

    ``layers``: the global (1-based) decoder layer numbers to count (default all); ``mtp`` / ``logits``:
    include the MTP modules / the output layer heads (the last pipeline stage holds both); ``tp``:
    one tensor-parallel rank's share (every counted GEMM splits evenly over TP).
    """
    layers = range(1, shape.num_layers + 1) if layers is None else list(layers)
    mtp_layers = range(shape.num_layers + 1, shape.num_layers + shape.mtp_num_layers + 1) if mtp else []
    h, f = shape.hidden_size, shape.ffn_hidden_size
    out = {"qkv": 0.0, "attention": 0.0, "proj": 0.0, "mlp": 0.0, "mtp_proj": 0.0, "mtp_norm": 0.0, "logits": 0.0}
    for n in [*layers, *mtp_layers]:
        out["qkv"] += 2 * h * (shape.q_size + 2 * shape.kv_size)
        out["attention"] += 2 * 2 * shape.q_size * shape.attended_keys(n, attention)
        out["proj"] += 2 * shape.q_size * h
        out["mlp"] += 2 * 3 * h * f
    depth = len(mtp_layers)
    out["mtp_proj"] = depth * 2 * (2 * h) * h  # eh_proj: [embedding; hidden] 2h -> h
    out["mtp_norm"] = depth * 2 * 3 * h  # Megatron-LM's "eh norm + final norm" term, kept to match it
    if logits:
        out["logits"] = (1 + shape.mtp_num_layers) * 2 * h * shape.vocab  # the output layer per head
    return {k: v / tp for k, v in out.items()}


def forward_flops_per_token(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                            kv_channels, vocab_size, seq_length, mtp_num_layers=0, window_size=None,
                            window_attn_skip_freq=None, attention: str = "causal", **_ignored) -> float:
    shape = ModelShape(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels,
                       vocab_size, seq_length, mtp_num_layers or 0, window_size or None, window_attn_skip_freq or None)
    return sum(forward_flops_breakdown(shape, attention=attention).values())


def model_flops_per_token(shape: ModelShape, attention: str = "causal") -> float:
    """Model FLOPs (forward + backward) per token of the whole model."""
    return 3.0 * sum(forward_flops_breakdown(shape, attention=attention).values())


def recompute_flops_per_token(shape: ModelShape, granularity: Optional[str], method: Optional[str] = None,
                              recompute_num_layers: Optional[int] = None, layers_per_chunk: Optional[int] = None,
                              layers: Optional[Iterable[int]] = None, mtp: bool = True,
                              attention: str = "causal", tp: int = 1) -> float:
    """Forward FLOPs per token repeated by activation recomputation (see the module docstring)."""
    if not granularity:
        return 0.0
    layers = list(range(1, shape.num_layers + 1) if layers is None else layers)
    if granularity == "selective":  # core attention of every layer, MTP layers included
        return forward_flops_breakdown(shape, layers, mtp, logits=False, attention=attention, tp=tp)["attention"]
    if granularity != "full":
        raise ValueError(f"recompute granularity {granularity!r}")
    method = method or "uniform"
    if method == "uniform":
        b = forward_flops_breakdown(shape, layers, mtp, logits=False, attention=attention, tp=tp)
        return sum(v for k, v in b.items() if k != "mtp_norm")
    if method == "block":
        per_chunk = layers_per_chunk or shape.num_layers
        n = recompute_num_layers if recompute_num_layers is not None else per_chunk
        chosen = [x for x in layers if (x - 1) % per_chunk < n]
        return sum(forward_flops_breakdown(shape, chosen, mtp=False, logits=False, attention=attention, tp=tp).values())
    raise ValueError(f"recompute method {method!r}")


def _recompute_from_args(args):
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    return dict(granularity=getattr(args, "recompute_granularity", None),
                method=getattr(args, "recompute_method", None),
                recompute_num_layers=getattr(args, "recompute_num_layers", None),
                layers_per_chunk=max(1, args.num_layers // (pp * vpp)))


def model_flops_per_iteration(args, batch_tokens: int, attention: str = "causal") -> float:
    """Model FLOPs (fwd + bwd) of one iteration over batch_tokens tokens."""
    return batch_tokens * model_flops_per_token(ModelShape.from_args(args), attention)


def hardware_flops_per_iteration(args, batch_tokens: int, attention: str = "causal") -> float:
    """Model FLOPs plus the forward work recomputed by activation checkpointing."""
    shape = ModelShape.from_args(args)
    extra = recompute_flops_per_token(shape, attention=attention, **_recompute_from_args(args))
    return batch_tokens * (model_flops_per_token(shape, attention) + extra)


# ------------------------------------------------------------------ pipeline stages
def stage_layer_numbers(num_layers: int, pp: int, vpp: int, rank: int) -> list:
    """Global 1-based decoder layers held by pipeline rank ``rank`` (its VPP chunks in order)."""
    vpp = vpp or 1
    if num_layers % (pp * vpp):
        raise ValueError(f"{num_layers} layers do not split over PP={pp} x VPP={vpp}")
    per_chunk = num_layers // (pp * vpp)
    out = []
    for chunk in range(vpp):
        start = (chunk * pp + rank) * per_chunk
        out.extend(range(start + 1, start + per_chunk + 1))
    return out


def stage_flops_per_token(shape: ModelShape, pp: int, vpp: int, rank: int, tp: int = 1,
                          recompute: Optional[dict] = None, attention: str = "causal") -> dict:
    """Per-token FLOPs (fwd + bwd) that one GPU of pipeline rank ``rank`` executes at tensor-parallel size tp.

    ``recompute``: dict(granularity, method, recompute_num_layers). Returns ``model`` and ``hardware``
    FLOPs (summed over the model chunks this rank holds) and the forward ``breakdown``.
    """
    layers = stage_layer_numbers(shape.num_layers, pp, vpp, rank)
    last = rank == pp - 1
    breakdown = forward_flops_breakdown(shape, layers, mtp=last, logits=last, attention=attention, tp=tp)
    model = 3.0 * sum(breakdown.values())
    rc = dict(recompute or {})
    extra = recompute_flops_per_token(
        shape, rc.get("granularity"), rc.get("method"), rc.get("recompute_num_layers"),
        layers_per_chunk=shape.num_layers // (pp * (vpp or 1)), layers=layers, mtp=last, attention=attention, tp=tp)
    return {"model": model, "hardware": model + extra, "breakdown": breakdown, "layers": layers,
            "pre_process": rank == 0, "post_process": last}


def _arch(args) -> dict:
    """Architecture fields of parsed flags (kept for callers of the old interface)."""
    return dataclasses.asdict(ModelShape.from_args(args))
