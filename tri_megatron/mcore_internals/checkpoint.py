"""Checkpoints: DistributedOptimizer state loading, the model chunks' sharded state dicts under the virtual-
pipeline rank, asynchronous saves and where (under which key) the common state lives.

Part of the megatron-core seam (``tri_megatron.mcore_internals``: see its docstring for every seam).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Iterator

import torch

from tri_megatron.mcore_internals.release import SeamError


# ===================================================================== DistributedOptimizer state loading
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prime_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam its state (with 'step') before a load.

    Without apex/TE, megatron-core's DistributedOptimizer.state_dict() reads every param's 'step', which
    torch Adam only creates on its first step; megatron's ``init_state_fn(optimizer, config)`` does not add it.
    """
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(inner, getattr(opt, "config", None))
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def torch_adam_step_passthrough(optimizer) -> Iterator[None]:
    """Without apex/TE, DistributedOptimizer.load_state_dict sets torch Adam's 'step' from the checkpoint,
    then copies every per-param state tensor from the fully-reshardable payload, which has no 'step'
    (KeyError), through ``self._set_main_param_and_optimizer_states(model_param, tensors)``. Wrap that
    method on each instance to hand the copy the step just restored, so it copies it onto itself."""
    patched = []
    for opt in _optimizers(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, _opt=opt, _setter=setter):
            steps = [s["step"] for s in _opt.optimizer.state.values() if "step" in s]
            if steps and "step" not in tensors:
                tensors = {**tensors, "step": steps[0]}
            return _setter(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
            # megatron hands every param the same 'step' tensor, which torch Adam then increments
            # once per param: give each its own.
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


# ================================================================ sharded state dicts of the model chunks
def model_sharded_state_dicts(chunks: list) -> list:
    """``sharded_state_dict`` of each model chunk (unwrapped GPTModels) as megatron's own checkpointing
    builds them: the metadata carries the DP/CP group (MTP off the first stage needs it) and, with
    several chunks (virtual pipeline), the global virtual-pipeline rank is set to the chunk's index
    while its dict is built (then put back)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(None)
    if len(chunks) == 1:
        return [chunks[0].sharded_state_dict(metadata=metadata)]
    before = parallel_state.get_virtual_pipeline_model_parallel_rank()
    out = []
    try:
        for i, chunk in enumerate(chunks):
            parallel_state.set_virtual_pipeline_model_parallel_rank(i)
            out.append(chunk.sharded_state_dict(metadata=metadata))
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_rank(before)
    return out


def async_sharded_save(state: dict, checkpoint_dir: str):
    """``dist_checkpointing.save(state, dir, async_sharded_save=True)``: megatron's ``AsyncRequest`` (a
    NamedTuple: ``async_fn`` writes this rank's shards; ``add_finalize_fn``, ``execute_sync``; scheduled by
    ``AsyncCallsQueue(persistent=).schedule_async_request``). 0.19 added ``async_strategy``, default
    ``"nvrx"``, which needs nvidia-resiliency-ext (not one of our dependencies): ask for megatron's own
    writer (``"mcore"``), the one 0.16 always uses. Its results queue is ours (``own_write_results_queue``).
    Call it from the main thread."""
    from megatron.core import dist_checkpointing

    own_write_results_queue()
    kwargs = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(state, checkpoint_dir, async_sharded_save=True, **kwargs)


_RESULTS_MANAGER = None  # the manager process behind megatron's write-results queue, while this process lives


def _filesystem_async():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        raise SeamError("write-results queue", "dist_checkpointing.strategies.filesystem_async has no _results_queue")
    return filesystem_async


def own_write_results_queue() -> None:
    """megatron's torch_dist writer sends every save's write results through the queue of a multiprocessing
    manager that it spawns on first use and keeps in the module global ``filesystem_async._results_queue``
    (its getter, ``_get_write_results_queue`` in 0.16 and ``get_write_results_queue`` in 0.19, returns the
    global once set). Nothing stops that process when the trainer is killed: it lingered, holding a Python
    with torch imported, after every SIGKILLed rank. Start the manager here instead, as megatron does (a
    spawned ``SyncManager``), with an initializer that makes it die with this process (``parent_death``).
    Once per process; nothing to do if the queue exists already."""
    global _RESULTS_MANAGER
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    from tri_megatron.parent_death import exit_unless_parent

    module = _filesystem_async()
    if module._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exit_unless_parent, initargs=(os.getpid(),))
    module._results_queue = manager.Queue()
    _RESULTS_MANAGER = manager


def common_state_in_common_pt() -> bool:
    """Whether megatron's distributed checkpoint keeps the common state in ``common.pt`` (up to 0.18,
    recorded as ``common_backend`` in ``metadata.json``) rather than as a ``ShardedObject`` (0.19)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return "common_backend" in {f.name for f in dataclasses.fields(CheckpointingConfig)}


def common_state_object_key() -> str:
    """The ``torch.distributed.checkpoint`` key of the common state 0.19 writes inside the checkpoint (the
    ``ShardedObject`` ``"common_state"``, shape (1,), offset (0,)), for reading it without a process group
    (``convert/megatron_ckpt.py``: Megatron-LM's ``args`` of a checkpoint without ``tri_meta.json``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("common_state", None, (1,), (0,)).unique_key
