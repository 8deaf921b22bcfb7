"""Weight mapping between megatron-core and Hugging Face names and layouts (pure tensor functions).

The pivot is the *canonical* form: the full (TP-merged) tensors a TP=1 megatron model holds, named as
its local-spec state dict with global layer numbers, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``,
``mtp.layers.0.transformer_layer.mlp.linear_fc1.weight``, ``embedding.word_embeddings.weight`` (padded vocab).

Layouts handled here:

* QKV: megatron interleaves per query group g: [q_g (heads_per_group*d rows), k_g (d), v_g (d)].
  TP ranks hold whole groups, so the TP-merged global tensor (what dist_checkpointing stores) has
  the same interleaving and is split by group, not by thirds.
* SwiGLU ``linear_fc1`` = [gate; up]. Each TP rank holds [gate_i; up_i]; megatron-core's dist
  checkpoint stores the merged [gate; up] (its swiglu sharded factory), so the canonical tensor is
  [gate; up] too. ``fc1_tp_shard`` / ``fc1_merge_tp_shards`` do the per-rank split when ranks'
  own tensors are involved (any per-rank source; the importer writes megatron's TP-merged chunks).
* Layer-norm-1p (zero-centred gamma): gamma is stored minus one; +1 on export, -1 on import.
* Vocabulary padding: padded rows dropped on export, restored as zeros on import.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Tuple

import torch

from tri_megatron.config.arch import ModelArch

# canonical layer suffix -> HF layer suffix (simple renames)
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.core_attention.query_scaling.ssmax_scale": "self_attn.ssmax_scale",
}
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
NORM_SUFFIXES = ("input_layernorm.weight", "pre_mlp_layernorm.weight")
MTP_RENAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
               "final_layernorm.weight": "shared_head.norm.weight"}
# Transformer Engine's fused layer-norm + linear names the norm after the linear it feeds.
TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
MTP_INNER_NAMES = ("transformer_layer", "mtp_model_layer")  # megatron-core < / >= 0.17


def canonical_layer_suffix(suffix: str) -> str:
    """Normalise a layer-relative name from either spec (TE fused norms or the local spec)."""
    return TE_NORM_ALIASES.get(suffix, suffix)


# ----------------------------------------------------------------------------------------- tensors
def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """megatron's interleaved [ng x (q_g, k_g, v_g)] -> (q, k, v) in HF head order."""
    hpg = num_heads // num_groups
    w = qkv.reshape(num_groups, (hpg + 2) * head_dim, -1)
    q = w[:, : hpg * head_dim].reshape(num_heads * head_dim, -1)
    k = w[:, hpg * head_dim: (hpg + 1) * head_dim].reshape(num_groups * head_dim, -1)
    v = w[:, (hpg + 1) * head_dim:].reshape(num_groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    hpg = num_heads // num_groups
    cols = q.shape[-1]
    parts = [q.reshape(num_groups, hpg * head_dim, cols), k.reshape(num_groups, head_dim, cols),
             v.reshape(num_groups, head_dim, cols)]
    return torch.cat(parts, dim=1).reshape(-1, cols).contiguous()


def split_fc1(fc1: torch.Tensor):
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def fc1_tp_shard(fc1: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The [gate_i; up_i] block TP rank i holds, from the merged [gate; up]."""
    gate, up = split_fc1(fc1)
    return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]]).contiguous()


def fc1_merge_tp_shards(shards: List[torch.Tensor]) -> torch.Tensor:
    """Per-rank [gate_i; up_i] blocks -> merged [gate; up]: split each shard before concatenating."""
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(list(gates) + list(ups)).contiguous()


def unpad_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return w[:vocab_size].contiguous()


def pad_vocab(w: torch.Tensor, padded_size: int) -> torch.Tensor:
    if w.shape[0] == padded_size:
        return w
    return torch.cat([w, w.new_zeros(padded_size - w.shape[0], *w.shape[1:])])


# ------------------------------------------------------------------------------------------ names
def arch_of(m: dict) -> ModelArch:
    """The architecture record of tri_meta.json's "model" (or an HF config's meta) the mapping works with."""
    return ModelArch.from_meta(m)


def layer_to_hf(prefix: str, suffix: str, t: torch.Tensor, arch: ModelArch) -> Iterator[Tuple[str, torch.Tensor]]:
    """One canonical decoder-block tensor -> HF tensors under ``prefix`` (``model.layers.N.``)."""
    if suffix == QKV:
        q, k, v = split_qkv(t, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels)
        yield prefix + "self_attn.q_proj.weight", q
        yield prefix + "self_attn.k_proj.weight", k
        yield prefix + "self_attn.v_proj.weight", v
    elif suffix == FC1:
        gate, up = split_fc1(t)
        yield prefix + "mlp.gate_proj.weight", gate
        yield prefix + "mlp.up_proj.weight", up
    elif suffix in LAYER_RENAMES:
        if suffix in NORM_SUFFIXES and arch.layernorm_zero_centered_gamma:
            t = t + 1
        yield prefix + LAYER_RENAMES[suffix], t
    else:
        raise KeyError(f"no Hugging Face name for layer tensor {suffix!r}")


_DEC = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")


def canonical_to_hf(name: str, t: torch.Tensor, arch: ModelArch, drop_mtp: bool = False):
    """One canonical tensor -> list of (HF name, tensor)."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", unpad_vocab(t, arch.vocab_size))]
    if name == "output_layer.weight":
        return [("lm_head.weight", unpad_vocab(t, arch.vocab_size))] if arch.untie_embeddings_and_output_weights else []
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t + 1 if arch.layernorm_zero_centered_gamma else t)]
    m = _DEC.match(name)
    if m:
        return list(layer_to_hf(f"model.layers.{m.group(1)}.", m.group(2), t, arch))
    m = _MTP.match(name)
    if m:
        if drop_mtp:
            return []
        prefix = f"model.layers.{arch.num_layers + int(m.group(1))}."
        rest = m.group(2)
        if rest in MTP_RENAMES:
            return [(prefix + MTP_RENAMES[rest], t + 1 if arch.layernorm_zero_centered_gamma and "norm" in rest else t)]
        inner, _, suffix = rest.partition(".")
        if inner in MTP_INNER_NAMES:
            return list(layer_to_hf(prefix, canonical_layer_suffix(suffix), t, arch))
    raise KeyError(f"no Hugging Face name for megatron tensor {name!r}")


def hf_layer_sources(prefix: str, suffix: str) -> List[str]:
    """HF names a canonical layer tensor is built from."""
    if suffix == QKV:
        return [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"]
    if suffix == FC1:
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    return [prefix + LAYER_RENAMES[suffix]]


def hf_to_canonical(name: str, get, arch: ModelArch) -> torch.Tensor:
    """Build one canonical tensor from HF tensors; ``get(hf_name)`` returns an HF tensor."""
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(get("model.embed_tokens.weight"), arch.padded_vocab_size())
    if name == "output_layer.weight":
        src = "lm_head.weight" if arch.untie_embeddings_and_output_weights else "model.embed_tokens.weight"
        return pad_vocab(get(src), arch.padded_vocab_size())
    if name == "decoder.final_layernorm.weight":
        t = get("model.norm.weight")
        return t - 1 if arch.layernorm_zero_centered_gamma else t
    m = _DEC.match(name)
    if m:
        return _hf_layer_to_canonical(f"model.layers.{m.group(1)}.", canonical_layer_suffix(m.group(2)), get, arch)
    m = _MTP.match(name)
    if m:
        prefix = f"model.layers.{arch.num_layers + int(m.group(1))}."
        rest = m.group(2)
        if rest in MTP_RENAMES:
            t = get(prefix + MTP_RENAMES[rest])
            return t - 1 if arch.layernorm_zero_centered_gamma and "norm" in rest else t
        inner, _, suffix = rest.partition(".")
        if inner in MTP_INNER_NAMES:
            return _hf_layer_to_canonical(prefix, canonical_layer_suffix(suffix), get, arch)
    raise KeyError(f"no Hugging Face source for megatron tensor {name!r}")


def _hf_layer_to_canonical(prefix: str, suffix: str, get, arch: ModelArch) -> torch.Tensor:
    srcs = [get(n) for n in hf_layer_sources(prefix, suffix)]
    if suffix == QKV:
        return merge_qkv(*srcs, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels)
    if suffix == FC1:
        return torch.cat(srcs).contiguous()
    t = srcs[0]
    if suffix in NORM_SUFFIXES and arch.layernorm_zero_centered_gamma:
        t = t - 1
    return t


def expected_hf_shapes(arch: ModelArch, drop_mtp: bool = False) -> Dict[str, tuple]:
    """Every HF tensor name and shape the export of this architecture contains."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    block = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h), "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h), "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if arch.ssmax:
        block["self_attn.ssmax_scale"] = (arch.num_attention_heads,)
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if arch.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in block.items()})
    for j in range(0 if drop_mtp else arch.mtp_num_layers):
        p = f"model.layers.{arch.num_layers + j}."
        shapes.update({p + k: v for k, v in block.items()})
        shapes.update({p + "enorm.weight": (h,), p + "hnorm.weight": (h,), p + "eh_proj.weight": (h, 2 * h),
                       p + "shared_head.norm.weight": (h,)})
    return shapes
