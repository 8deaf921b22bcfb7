"""Host stand-ins: what megatron-core needs to run without CUDA or NCCL (RNG tracker, gloo groups, cross entropy
on a group, RoPE).

Part of the megatron-core seam (``tri_megatron.mcore_internals``: see its docstring for every seam).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Iterator

import torch

from tri_megatron.mcore_internals.release import SeamError


# =========================================================================================== host stand-ins
RNG_TRACKER_HOOKS = ("_set_cuda_rng_state", "_get_cuda_rng_state")
_HOST_RNG_WARNING = "CPU RNG state changed"


def route_rng_tracker_to_host() -> None:
    """megatron's CUDA RNG tracker reads and writes the generator through the private module functions
    ``tensor_parallel.random._set_cuda_rng_state`` / ``_get_cuda_rng_state``: point them at the host
    generator (which stands in for the device's), and silence the tracker's warning that the host state
    changed (its fork swaps it on purpose here)."""
    from megatron.core.tensor_parallel import random as mpu_random

    missing = [n for n in RNG_TRACKER_HOOKS if not hasattr(mpu_random, n)]
    if missing:
        raise SeamError("RNG tracker on the host", f"megatron.core.tensor_parallel.random has no {missing}")
    mpu_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    logging.getLogger(mpu_random.__name__).addFilter(lambda record: _HOST_RNG_WARNING not in record.getMessage())


@contextlib.contextmanager
def gloo_groups_as_main() -> Iterator[None]:
    """megatron's gloo groups (used only to save / load distributed-optimizer state) answered with the
    corresponding main groups, for a fake world where gloo cannot run (call after
    ``initialize_model_parallel(..., create_gloo_process_groups=False)``). megatron's optimizer reads them
    through the ``parallel_state`` module, so rebinding the module's getters reaches it."""
    from megatron.core import parallel_state as ps

    saved = (ps.get_data_parallel_group_gloo, ps.get_expert_data_parallel_group_gloo)
    ps.get_data_parallel_group_gloo = lambda with_context_parallel=False, partial_data_parallel=False: \
        ps.get_data_parallel_group(with_context_parallel=with_context_parallel,
                                   partial_data_parallel=partial_data_parallel)
    ps.get_expert_data_parallel_group_gloo = lambda partial_expert_data_parallel=False: \
        ps.get_expert_data_parallel_group(partial_expert_data_parallel=partial_expert_data_parallel)
    try:
        yield
    finally:
        ps.get_data_parallel_group_gloo, ps.get_expert_data_parallel_group_gloo = saved


def vocab_parallel_cross_entropy_on(group):
    """megatron's ``vocab_parallel_cross_entropy(logits, target)`` on the tensor-parallel group ``group``
    without megatron's parallel state: 0.19 takes ``tp_group=``; 0.16 reads the group, rank and size
    through getters bound in ``tensor_parallel.cross_entropy``, rebound here (for the process)."""
    from megatron.core.tensor_parallel import cross_entropy as mce

    if "tp_group" in inspect.signature(mce.vocab_parallel_cross_entropy).parameters:
        return functools.partial(mce.vocab_parallel_cross_entropy, tp_group=group)
    getters = ("get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
               "get_tensor_model_parallel_world_size")
    missing = [g for g in getters if not hasattr(mce, g)]
    if missing:
        raise SeamError("vocab_parallel_cross_entropy on a group", f"neither tp_group= nor the getters {missing}")
    mce.get_tensor_model_parallel_group = lambda: group
    mce.get_tensor_model_parallel_rank = lambda: group.rank()
    mce.get_tensor_model_parallel_world_size = lambda: group.size()
    return mce.vocab_parallel_cross_entropy


def megatron_rope_bshd():
    """megatron's unfused RoPE on one [s, b, h, d] tensor, ``f(t, freqs)`` (the private
    ``rope_utils._apply_rotary_pos_emb_bshd``; 0.19 added ``mla_rotary_interleaved``)."""
    from megatron.core.models.common.embeddings import rope_utils

    fn = getattr(rope_utils, "_apply_rotary_pos_emb_bshd", None)
    if fn is None:
        raise SeamError("megatron RoPE (bshd)", "rope_utils._apply_rotary_pos_emb_bshd is gone")
    return fn
