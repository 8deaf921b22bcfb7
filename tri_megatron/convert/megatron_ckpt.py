"""Reads a megatron-core distributed checkpoint (torch_dist) in one process, whatever layout saved it.

dist_checkpointing stores every tensor under its global key and global shape (decoder layers stacked
on a leading layer axis, TP shards already merged), so one process can read any TP/PP/VPP/DP layout
with ``torch.distributed.checkpoint`` and no process group. ``MegatronCheckpoint`` checks the files
first (every storage file the metadata names is present and long enough; every model tensor present
with the shape the architecture implies) and then yields canonical tensors one layer at a time, so
memory stays at about one layer (or the embedding) whatever the model size; ``iter_canonical(meta=True)``
yields the same names as meta tensors, for planning the output before anything is read.

The architecture comes from ``tri_meta.json``; a Megatron-LM checkpoint without it is described by
the ``args`` in its common state instead (``common.pt`` up to megatron-core 0.18, an object among the
shards since 0.19).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import torch

from tri_megatron.convert.mapping import MTP_INNER_NAMES, TE_NORM_ALIASES, arch_of


class CheckpointError(ValueError):
    """The checkpoint is incomplete or does not match its own description; nothing was written."""


LAYER_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
NORM_CHOICES = {  # canonical suffix -> names it may be stored under (TE fused spec first)
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
}
SSMAX = "self_attention.core_attention.query_scaling.ssmax_scale"
UNSUPPORTED_MARKERS = (".bias", "layer_norm_bias", "q_layernorm", "k_layernorm", ".experts.", ".router.")


def resolve_checkpoint(path: str) -> str:
    """A save root (newest complete iteration) or an iteration directory -> the iteration directory."""
    from tri_megatron.training.checkpointing import TRACKER, find_latest_checkpoint, iter_dir

    found = find_latest_checkpoint(path)
    if found is None and os.path.isfile(os.path.join(path, "metadata.json")):
        found = path  # a Megatron-LM iteration directory (no tri_meta.json)
    if found is None and os.path.isfile(os.path.join(path, TRACKER)):
        it = open(os.path.join(path, TRACKER)).read().strip()
        cand = iter_dir(path, int(it)) if it.isdigit() else None
        if cand and os.path.isfile(os.path.join(cand, "metadata.json")):
            found = cand
    if found is None:
        raise CheckpointError(f"{path}: no complete distributed checkpoint (expected tri_meta.json and "
                              f"metadata.json, or a save directory with latest_checkpointed_iteration.txt)")
    return found


def meta_from_megatron_args(args) -> dict:
    """Architecture fields from a Megatron-LM ``args`` namespace (checkpoints without tri_meta.json)."""
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    if g("normalization", "RMSNorm") != "RMSNorm" or not g("swiglu", True):
        raise CheckpointError("only RMSNorm + SwiGLU (Llama-style) Megatron-LM checkpoints are supported")
    heads = g("num_attention_heads")
    return {
        "num_layers": g("num_layers"), "hidden_size": g("hidden_size"), "ffn_hidden_size": g("ffn_hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": g("num_query_groups") if g("group_query_attention") else heads,
        "kv_channels": g("kv_channels") or g("hidden_size") // heads,
        "vocab_size": g("vocab_size") or g("padded_vocab_size"),
        "mtp_num_layers": g("mtp_num_layers") or 0, "ssmax": False,
        "untie_embeddings_and_output_weights": bool(g("untie_embeddings_and_output_weights")),
        "rotary_base": float(g("rotary_base", 10000)), "norm_epsilon": g("norm_epsilon", 1e-5),
        "max_position_embeddings": g("max_position_embeddings"), "seq_length": g("seq_length"),
        "no_rope_freq": g("no_rope_freq"), "window_size": None, "window_attn_skip_freq": None,
        "attn_temperature_tuning": False, "layernorm_zero_centered_gamma": bool(g("apply_layernorm_1p")),
        "model": "megatron-lm",
    }


def read_common_state(path: str):
    """The common (non-sharded) state of a torch_dist checkpoint, read in this process: ``common.pt``
    (megatron-core up to 0.18) or the ``common_state`` object 0.19 stores among the shards; None when it
    has neither. Unpickled with ``weights_only=False`` (as torch's checkpoint planner does): Megatron-LM's
    ``args`` is an argparse namespace, so read only checkpoints you trust."""
    import io

    import torch.distributed.checkpoint as dcp

    from tri_megatron.convert.dcp_local import load_local
    from tri_megatron.mcore_internals import common_state_object_key

    common = os.path.join(path, "common.pt")
    if os.path.isfile(common):
        return torch.load(common, map_location="cpu", weights_only=False)
    key = common_state_object_key()
    reader = dcp.FileSystemReader(path)
    try:
        if key not in reader.read_metadata().state_dict_metadata:
            return None
    except Exception:  # noqa: BLE001 - no readable metadata: no common state (MegatronCheckpoint says why)
        return None

    holder = {key: io.BytesIO()}  # the default planner unpickles the stored bytes (weights_only=False)
    load_local(holder, reader, dcp.DefaultLoadPlanner())
    state = holder[key]
    if isinstance(state, io.BytesIO):
        state.seek(0)
        state = torch.load(state, map_location="cpu", weights_only=False)
    return state[0] if isinstance(state, (list, tuple)) else state  # megatron stores a one-item list


def read_checkpoint_meta(path: str) -> dict:
    tri = os.path.join(path, "tri_meta.json")
    if os.path.isfile(tri):
        with open(tri) as f:
            return json.load(f)
    state = read_common_state(path)
    if isinstance(state, dict) and state.get("args") is not None:
        return {"iteration": state.get("iteration", 0), "model": meta_from_megatron_args(state["args"]),
                "layout": {}, "has_optimizer": False}
    raise CheckpointError(f"{path}: neither tri_meta.json nor Megatron-LM args in its common state (common.pt, "
                          f"or the checkpoint's common_state object) describe the model")


def _expected_shapes(m: dict) -> Dict[str, tuple]:
    """Canonical-suffix shapes of one decoder layer and the non-layer tensors."""
    h, f = m["hidden_size"], m["ffn_hidden_size"]
    nh, ng, d = m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    return {
        "self_attention.linear_qkv.weight": ((nh + 2 * ng) * d, h),
        "self_attention.linear_proj.weight": (h, nh * d),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        SSMAX: (nh,),
    }


class MegatronCheckpoint:
    def __init__(self, path: str):
        import torch.distributed.checkpoint as dcp

        self.path = resolve_checkpoint(path)
        self.meta = read_checkpoint_meta(self.path)
        self.model = dict(self.meta["model"])
        self.arch = arch_of(self.model)
        self.reader = dcp.FileSystemReader(self.path)
        try:
            self.md = self.reader.read_metadata()
        except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same error for the user
            raise CheckpointError(f"{self.path}: unreadable checkpoint metadata (.metadata): {exc}") from None
        self.tensors = {k: v for k, v in self.md.state_dict_metadata.items() if hasattr(v, "size")}
        self._plan()

    # ------------------------------------------------------------------------------------ checks
    def _plan(self) -> None:
        m, arch = self.model, self.arch
        shapes = _expected_shapes(m)
        self.layer_keys: Dict[str, str] = {}  # canonical suffix -> stored stacked key
        for suffix in LAYER_SUFFIXES + ((SSMAX,) if m.get("ssmax") else ()):
            self.layer_keys[suffix] = "decoder.layers." + suffix
        for canon, choices in NORM_CHOICES.items():
            self.layer_keys[canon] = next(("decoder.layers." + c for c in choices
                                           if "decoder.layers." + c in self.tensors), "decoder.layers." + choices[0])
        self.single_keys = {"embedding.word_embeddings.weight": (arch.padded_vocab_size(), arch.hidden_size),
                            "decoder.final_layernorm.weight": (arch.hidden_size,)}
        if arch.untie_embeddings_and_output_weights:
            self.single_keys["output_layer.weight"] = (arch.padded_vocab_size(), arch.hidden_size)
        self.mtp_keys: Dict[str, str] = {}  # canonical name -> stored key
        for j in range(arch.mtp_num_layers):
            p = f"mtp.layers.{j}."
            for n in ("enorm.weight", "hnorm.weight", "final_layernorm.weight"):
                self.mtp_keys[p + n] = p + n
                self.single_keys[p + n] = (arch.hidden_size,)
            self.mtp_keys[p + "eh_proj.weight"] = p + "eh_proj.weight"
            self.single_keys[p + "eh_proj.weight"] = (arch.hidden_size, 2 * arch.hidden_size)
            inner = next((i for i in MTP_INNER_NAMES if any(k.startswith(f"{p}{i}.") for k in self.tensors)),
                         MTP_INNER_NAMES[0])
            for canon in shapes:
                if canon == SSMAX and not m.get("ssmax"):
                    continue
                stored = canon
                for te, local in TE_NORM_ALIASES.items():
                    if canon == local and f"{p}{inner}.{te}" in self.tensors:
                        stored = te
                self.mtp_keys[f"{p}transformer_layer.{canon}"] = f"{p}{inner}.{stored}"
                self.single_keys[f"{p}{inner}.{stored}"] = shapes[canon]
        problems = []
        for suffix, key in self.layer_keys.items():
            problems += self._check(key, (m["num_layers"],) + shapes[suffix])
        for key, shape in self.single_keys.items():
            problems += self._check(key, shape)
        for key in self.tensors:
            if (key.startswith(("decoder.", "mtp.", "embedding.", "output_layer."))
                    and any(mark in key for mark in UNSUPPORTED_MARKERS)):
                problems.append(f"tensor {key} is not supported by the converter (biases, LayerNorm, QK-norm, MoE)")
        if problems:
            raise CheckpointError(f"{self.path}: checkpoint does not match its description "
                                  f"({self._describe()}): " + "; ".join(problems[:6]))
        self._check_files()

    def _describe(self) -> str:
        m = self.model
        return (f"num_layers={m['num_layers']} hidden_size={m['hidden_size']} ffn_hidden_size={m['ffn_hidden_size']} "
                f"heads={m['num_attention_heads']}/{m['num_query_groups']} kv_channels={m['kv_channels']} "
                f"vocab_size={m['vocab_size']} mtp_num_layers={m.get('mtp_num_layers') or 0}")

    def _check(self, key: str, shape: tuple) -> list:
        if key not in self.tensors:
            return [f"tensor {key} is missing"]
        got = tuple(self.tensors[key].size)
        if got != tuple(shape):
            return [f"tensor {key} has shape {list(got)}, expected {list(shape)}"]
        covered = sum(_numel(c.sizes) for c in self.tensors[key].chunks)
        if covered != _numel(shape):
            return [f"tensor {key}: saved chunks cover {covered} of {_numel(shape)} elements"]
        return []

    def _check_files(self) -> None:
        sizes: Dict[str, int] = {}
        for info in (self.md.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is None:
                continue
            end = info.offset + info.length
            sizes[rel] = max(sizes.get(rel, 0), end)
        missing = [r for r in sorted(sizes) if not os.path.isfile(os.path.join(self.path, r))]
        if missing:
            raise CheckpointError(f"{self.path}: missing shard file(s) {', '.join(missing[:5])} "
                                  f"({len(missing)} of {len(sizes)}); the checkpoint is incomplete")
        short = [r for r, n in sorted(sizes.items()) if os.path.getsize(os.path.join(self.path, r)) < n]
        if short:
            raise CheckpointError(f"{self.path}: truncated shard file(s) {', '.join(short[:5])}; the checkpoint is incomplete")

    # ------------------------------------------------------------------------------------ reading
    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["embedding.word_embeddings.weight"].properties.dtype

    def _load(self, wanted: Dict[str, Tuple[tuple, tuple]], meta: bool = False) -> Dict[str, torch.Tensor]:
        """Read regions {key: (offsets, sizes)} of global tensors (only the chunks that overlap);
        with meta, only their shapes and dtypes (meta tensors, nothing read)."""
        from tri_megatron.convert.dcp_local import load_local

        if meta:
            return {key: torch.empty(sizes, dtype=self.tensors[key].properties.dtype, device="meta")
                    for key, (_, sizes) in wanted.items()}
        state, regions = {}, {}
        for key, (offsets, sizes) in wanted.items():
            t = torch.empty(sizes, dtype=self.tensors[key].properties.dtype)
            t.__get_tensor_shard__ = lambda index, t=t: t  # torch DCP's shard-lookup protocol
            state[key] = t
            regions[key] = (offsets, sizes)
        load_local(state, self.reader, _RegionPlanner(regions))
        for t in state.values():  # break the tensor <-> lambda cycle: freed when released, not at the next gc
            del t.__get_tensor_shard__
        return state

    def _whole(self, keys, meta: bool = False) -> Dict[str, torch.Tensor]:
        return self._load({k: ((0,) * len(self.tensors[k].size), tuple(self.tensors[k].size)) for k in keys}, meta)

    def iter_canonical(self, meta: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """(canonical name, full tensor) in model order: embedding, layers, final norm, output, MTP.
        At most one decoder layer (or the MTP modules, or one embedding) is read at a time. With meta,
        the same sequence as meta tensors (shapes and dtypes for planning, nothing read)."""
        yield from self._whole(["embedding.word_embeddings.weight"], meta).items()
        for i in range(self.arch.num_layers):
            wanted = {}
            for suffix, key in self.layer_keys.items():
                shape = tuple(self.tensors[key].size)
                wanted[key] = ((i,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
            got = self._load(wanted, meta)
            for suffix, key in self.layer_keys.items():
                yield f"decoder.layers.{i}.{suffix}", got[key][0]
            del got  # not held while the next region is read
        yield from self._whole(["decoder.final_layernorm.weight"], meta).items()
        if self.arch.untie_embeddings_and_output_weights:
            yield from self._whole(["output_layer.weight"], meta).items()
        if self.mtp_keys:
            got = self._whole(sorted(set(self.mtp_keys.values())), meta)
            for canon, key in self.mtp_keys.items():
                yield canon, got[key]

    def canonical_state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.iter_canonical())


def _region_planner_class():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        """Loads a region of each global tensor (e.g. one layer of a stacked decoder tensor)."""

        def __init__(self, regions):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.regions = regions

        def create_local_plan(self):
            requests = []
            for fqn in self.state_dict:
                offsets, sizes = self.regions[fqn]
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                requests += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(requests)

    return RegionPlanner


def _RegionPlanner(regions):
    return _region_planner_class()(regions)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
