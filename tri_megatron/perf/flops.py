"""FLOP accounting for the Tri architecture, in Megatron-LM's convention unless told otherwise.

Every count takes the architecture (``tri_megatron.config.arch.ModelArch``) and the training sequence
length explicitly; device peaks live in ``tri_megatron.perf.devices``.

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

from typing import Iterable, Optional

from tri_megatron.config.arch import ModelArch

ATTENTION_CONVENTIONS = ("causal", "full")


def attended_keys(arch: ModelArch, seq_length: int, layer_number: int, attention: str = "causal") -> float:
    """Keys per query in one (1-based, global) layer, averaged over the sequence, under a FLOP convention."""
    s = seq_length
    window = arch.window_size if arch.is_window_layer(layer_number, seq_length) else None
    if attention == "causal":
        return s / 2.0 if window is None else window * (1.0 - window / (2.0 * s))
    if attention == "full":
        return float(s if window is None else window)
    raise ValueError(f"attention convention {attention!r}: use one of {ATTENTION_CONVENTIONS}")


def forward_flops_breakdown(arch: ModelArch, seq_length: int, layers: Optional[Iterable[int]] = None,
                            mtp: bool = True, logits: bool = True, attention: str = "causal", tp: int = 1) -> dict:
    """Forward FLOPs per token by component.

    ``layers``: the global (1-based) decoder layer numbers to count (default all); ``mtp`` / ``logits``:
    include the MTP modules / the output layer heads (the last pipeline stage holds both); ``tp``:
    one tensor-parallel rank's share (every counted GEMM splits evenly over TP).
    """
    layers = range(1, arch.num_layers + 1) if layers is None else list(layers)
    mtp_layers = range(arch.num_layers + 1, arch.num_layers + arch.mtp_num_layers + 1) if mtp else []
    h, f = arch.hidden_size, arch.ffn_hidden_size
    out = {"qkv": 0.0, "attention": 0.0, "proj": 0.0, "mlp": 0.0, "mtp_proj": 0.0, "mtp_norm": 0.0, "logits": 0.0}
    for n in [*layers, *mtp_layers]:
        out["qkv"] += 2 * h * (arch.q_size + 2 * arch.kv_size)
        out["attention"] += 2 * 2 * arch.q_size * attended_keys(arch, seq_length, n, attention)  # QK^T and AV
        out["proj"] += 2 * arch.q_size * h
        out["mlp"] += 2 * 3 * h * f  # SwiGLU: h -> 2f (gate, up), f -> h
    depth = len(mtp_layers)
    out["mtp_proj"] = depth * 2 * (2 * h) * h  # eh_proj: [embedding; hidden] 2h -> h
    out["mtp_norm"] = depth * 2 * 3 * h  # Megatron-LM's "eh norm + final norm" term, kept to match it
    if logits:  # the output layer per head, over the padded vocabulary the model is built with
        out["logits"] = (1 + arch.mtp_num_layers) * 2 * h * arch.padded_vocab_size()
    return {k: v / tp for k, v in out.items()}


def model_flops_per_token(arch: ModelArch, seq_length: int, attention: str = "causal") -> float:
    """Model FLOPs (forward + backward) per token of the whole model."""
    return 3.0 * sum(forward_flops_breakdown(arch, seq_length, attention=attention).values())


def recompute_flops_per_token(arch: ModelArch, seq_length: int, granularity: Optional[str],
                              method: Optional[str] = None, recompute_num_layers: Optional[int] = None,
                              layers_per_chunk: Optional[int] = None, layers: Optional[Iterable[int]] = None,
                              mtp: bool = True, attention: str = "causal", tp: int = 1) -> float:
    """Forward FLOPs per token repeated by activation recomputation (see the module docstring)."""
    if not granularity:
        return 0.0
    layers = list(range(1, arch.num_layers + 1) if layers is None else layers)
    if granularity == "selective":  # core attention of every layer, MTP layers included
        return forward_flops_breakdown(arch, seq_length, layers, mtp, logits=False, attention=attention,
                                       tp=tp)["attention"]
    if granularity != "full":
        raise ValueError(f"recompute granularity {granularity!r}")
    method = method or "uniform"
    if method == "uniform":
        b = forward_flops_breakdown(arch, seq_length, layers, mtp, logits=False, attention=attention, tp=tp)
        return sum(v for k, v in b.items() if k != "mtp_norm")
    if method == "block":
        per_chunk = layers_per_chunk or arch.num_layers
        n = recompute_num_layers if recompute_num_layers is not None else per_chunk
        chosen = [x for x in layers if (x - 1) % per_chunk < n]
        return sum(forward_flops_breakdown(arch, seq_length, chosen, mtp=False, logits=False, attention=attention,
                                           tp=tp).values())
    raise ValueError(f"recompute method {method!r}")


def model_flops_per_iteration(arch: ModelArch, seq_length: int, batch_tokens: int,
                              attention: str = "causal") -> float:
    """Model FLOPs (fwd + bwd) of one iteration over ``batch_tokens`` tokens in sequences of ``seq_length``."""
    return batch_tokens * model_flops_per_token(arch, seq_length, attention)


def hardware_flops_per_iteration(arch: ModelArch, seq_length: int, batch_tokens: int, *,
                                 recompute_granularity: Optional[str] = None, recompute_method: Optional[str] = None,
                                 recompute_num_layers: Optional[int] = None, pp: int = 1, vpp: Optional[int] = None,
                                 attention: str = "causal") -> float:
    """Model FLOPs plus the forward work recomputed by activation checkpointing.

    The recompute settings are the flags' (``--recompute-granularity/-method/-num-layers``); ``pp`` /
    ``vpp`` decide the model chunk that ``block`` recomputation counts its layers in."""
    extra = recompute_flops_per_token(
        arch, seq_length, recompute_granularity, recompute_method, recompute_num_layers,
        layers_per_chunk=max(1, arch.num_layers // ((pp or 1) * (vpp or 1))), attention=attention)
    return batch_tokens * (model_flops_per_token(arch, seq_length, attention) + extra)


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


def stage_flops_per_token(arch: ModelArch, seq_length: int, pp: int, vpp: int, rank: int, tp: int = 1,
                          recompute: Optional[dict] = None, attention: str = "causal") -> dict:
    """Per-token FLOPs (fwd + bwd) that one GPU of pipeline rank ``rank`` executes at tensor-parallel size tp.

    ``recompute``: dict(granularity, method, recompute_num_layers). Returns ``model`` and ``hardware``
    FLOPs (summed over the model chunks this rank holds) and the forward ``breakdown``.
    """
    layers = stage_layer_numbers(arch.num_layers, pp, vpp, rank)
    last = rank == pp - 1
    breakdown = forward_flops_breakdown(arch, seq_length, layers, mtp=last, logits=last, attention=attention, tp=tp)
    model = 3.0 * sum(breakdown.values())
    rc = dict(recompute or {})
    extra = recompute_flops_per_token(
        arch, seq_length, rc.get("granularity"), rc.get("method"), rc.get("recompute_num_layers"),
        layers_per_chunk=arch.num_layers // (pp * (vpp or 1)), layers=layers, mtp=last, attention=attention, tp=tp)
    return {"model": model, "hardware": model + extra, "breakdown": breakdown, "layers": layers,
            "pre_process": rank == 0, "post_process": last}
