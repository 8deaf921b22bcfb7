"""Writes a megatron-core distributed checkpoint (torch_dist) chunk by chunk, with no model in memory.

megatron-core still decides what is stored: the model is built once on the meta device (TP=PP=1, one
process) and its own ``sharded_state_dict`` (factories applied) names every key, global shape and
chunk (decoder layer, SwiGLU gate/up half, extra-state object). Only the bytes are produced lazily:
``torch.distributed.checkpoint``'s file writer (one thread) asks the planner for one chunk at a time,
the planner builds it from ``get_canonical(name)`` (the canonical TP-merged tensor, e.g. from HF
safetensors through the mapping), narrows it to the chunk, and the writer stores and drops it. Host
memory is one canonical tensor (plus its chunk), whatever the model size.

The result is the torch_dist format megatron-core loads and reshards at any layout (``.metadata`` +
``__0_0.distcp``, ``metadata.json`` from megatron's own writer, and the common state where the
installed megatron-core keeps it: ``common.pt`` before 0.19, a ``common_state`` object since), inside the
project's checkpoint directory (``iter_0000000/tri_meta.json``, the tracker file) — what
``pretrain_tri.py --load`` continues from. It holds weights only (no optimizer) and no RNG states:
``tri_meta.json`` records the runtime as ``host/import``, so a load never looks for them.
"""

from __future__ import annotations

import io
import json
import os
from typing import Callable, Dict, List, Tuple

import torch

IMPORT_RUNTIME = {"device": "host", "backend": "import", "virtual": False}  # no RNG states to restore


def meta_sharded_state(cfg) -> Tuple[list, list]:
    """(ShardedTensors, ShardedObjects) megatron-core stores for this model (main replicas only),
    from the model built on the meta device at TP=PP=1 in this process."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from tri_megatron.local_dist import init_single_process
    from tri_megatron.model.builder import build_gpt_model
    from tri_megatron.model.config import transformer_config
    from tri_megatron.training.checkpointing import _model_sharded_state_dict

    init_single_process()
    config = transformer_config(cfg, False)
    config.perform_initialization = False
    config.use_cpu_initialization = True  # no explicit device: the meta context below decides
    with torch.device("meta"):
        model = build_gpt_model(config, cfg, False, True, True)
        if cfg.training.bf16:
            model = model.bfloat16()  # what megatron's Float16Module does to the weights
    chunks = [model]
    not_meta = [n for c in chunks for n, p in c.named_parameters() if p.device.type != "meta"]
    if not_meta:  # a layer that ignores the meta device would allocate the whole model
        raise RuntimeError(f"parameters built off the meta device: {not_meta[:3]}")
    sd = _model_sharded_state_dict(chunks)
    apply_factories(sd)
    tensors, objects = [], []
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            if v.flattened_range is not None:
                raise RuntimeError(f"{v.key}: flattened sharded tensors are not expected in a model state dict")
            if all(r == 0 for r in _replica(v.replica_id)):
                tensors.append(v)
        elif isinstance(v, ShardedObject):
            if all(r == 0 for r in _replica(v.replica_id)):
                objects.append(v)
        else:
            raise RuntimeError(f"unexpected entry in the model's sharded state dict: {type(v).__name__}")
    return tensors, objects


def _replica(rid) -> tuple:
    return tuple(rid) if isinstance(rid, (tuple, list)) else (rid,)


def canonical_name(key: str, global_offset: tuple, prepend: int) -> str:
    """The canonical tensor a stored chunk comes from (stacked decoder keys: the layer's own name)."""
    if prepend:
        if prepend != 1 or not key.startswith("decoder.layers."):
            raise RuntimeError(f"{key}: unexpected {prepend} prepended axes")
        return f"decoder.layers.{global_offset[0]}.{key[len('decoder.layers.'):]}"
    return key


class ChunkSource:
    """Chunk tensors for the planner: canonical tensors from ``get_canonical``, one held at a time."""

    def __init__(self, get_canonical: Callable[[str], torch.Tensor]):
        self.get_canonical = get_canonical
        self._name, self._tensor = None, None
        self.peak_tensor_bytes = 0

    def chunk(self, st) -> torch.Tensor:
        prepend = st.prepend_axis_num
        name = canonical_name(st.key, st.global_offset, prepend)
        if name != self._name:
            self._name, self._tensor = None, None  # release before reading the next
            self._tensor, self._name = self.get_canonical(name), name
        full = self._tensor
        expected = tuple(st.global_shape[prepend:])
        if tuple(full.shape) != expected:
            raise ValueError(f"{name}: source tensor {list(full.shape)}, the model stores {list(expected)}")
        region = full
        for dim, (off, size) in enumerate(zip(st.global_offset[prepend:], st.local_shape)):
            region = region.narrow(dim, off, size)
        out = region.to(st.dtype).contiguous().reshape((1,) * prepend + tuple(st.local_shape))
        self.peak_tensor_bytes = max(self.peak_tensor_bytes, full.nbytes + out.nbytes)
        return out


def _planner(tensors: list, objects: list, source: ChunkSource):
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import (SavePlan, SavePlanner, TensorWriteData, WriteItem,
                                                      WriteItemType)

    items: List[WriteItem] = []
    lookup: Dict[tuple, object] = {}
    for st in tensors:
        offsets = torch.Size(st.global_offset)
        sizes = torch.Size((1,) * st.prepend_axis_num + tuple(st.local_shape))
        if len(offsets) != len(st.global_shape):
            raise RuntimeError(f"{st.key}: offsets {tuple(offsets)} do not match global shape {st.global_shape}")
        items.append(WriteItem(index=MetadataIndex(st.key, offsets), type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                           properties=TensorProperties(dtype=st.dtype),
                                                           size=torch.Size(st.global_shape))))
        lookup[(st.key, tuple(offsets))] = st
    for obj in objects:
        items.append(WriteItem(index=MetadataIndex(obj.unique_key), type=WriteItemType.BYTE_IO))
        lookup[(obj.unique_key, None)] = obj

    class ChunkPlanner(SavePlanner):
        """Saves the planned chunks; each chunk's data is made only when the writer asks for it."""

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            self.plan = None

        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan):
            self.plan = new_plan
            return new_plan

        def resolve_data(self, write_item):
            idx = write_item.index
            entry = lookup[(idx.fqn, tuple(idx.offset) if idx.offset is not None else None)]
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save([entry.data], buf)  # megatron-core's encoding of sharded objects
                buf.seek(0)
                return buf
            return source.chunk(entry)

    return ChunkPlanner()


def write_checkpoint(root: str, cfg, get_canonical: Callable[[str], torch.Tensor], iteration: int = 0,
                     consumed_samples: int = 0) -> dict:
    """Write ``root/iter_NNNNNNN`` (weights only; iteration 0 unless the source's progress is kept) for the
    model of the run ``cfg`` (RunConfig), chunk by chunk; ``cfg.parallel`` is the layout recorded in
    tri_meta.json (the stored chunks do not depend on it). A kept progress (iteration > 0) is marked
    ``continue_schedule`` in tri_meta.json: the run that loads it steps its fresh learning-rate schedule to
    the consumed samples instead of warming up again."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    from tri_megatron.convert.dcp_local import save_local
    from tri_megatron.convert.megatron_runtime import run_config_for
    from tri_megatron.mcore_internals import common_state_in_common_pt
    from tri_megatron.training.checkpointing import META, TRACKER, checkpoint_meta, iter_dir

    single = run_config_for(checkpoint_meta(cfg, 0, 0, IMPORT_RUNTIME, False)["model"], bf16=cfg.training.bf16)
    tensors, objects = meta_sharded_state(single)
    common = {"scheduler": None, "iteration": iteration, "consumed_samples": consumed_samples}  # as save_checkpoint
    # megatron-core < 0.19 keeps the common state in common.pt; 0.19 in the checkpoint, as one object
    legacy_common = common_state_in_common_pt()
    if not legacy_common:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        objects.append(ShardedObject("common_state", common, (1,), (0,)))
    source = ChunkSource(get_canonical)
    path = iter_dir(root, iteration)
    os.makedirs(path)
    save_local({}, dcp.FileSystemWriter(path, single_file_per_rank=True, thread_count=1),
               _planner(tensors, objects, source))
    save_config(CheckpointingConfig("torch_dist", 1), path)
    if legacy_common:
        torch.save(common, os.path.join(path, "common.pt"))
    meta = checkpoint_meta(cfg, iteration, consumed_samples, IMPORT_RUNTIME, has_optimizer=False)
    if iteration:
        meta["continue_schedule"] = True
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(str(iteration))
    return {"chunks": len(tensors), "objects": len(objects), "peak_tensor_bytes": source.peak_tensor_bytes}

