"""Process-group set-up: one code path for torchrun's and SLURM's variables (``tri_megatron.launcher``); the backend is the
runtime's (``tri_megatron.runtime``: NCCL on GPU, gloo on CPU and on the virtual device), agreed by
all ranks through the rendezvous store before the group is built."""

from __future__ import annotations

import datetime
import faulthandler
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from tri_megatron import runtime as runtime_mod
from tri_megatron.launcher import launch_env


def init_distributed(parallel, seed: int, rt) -> dict:
    """Initialise torch.distributed and megatron-core's parallel state for the layout ``parallel``
    (ParallelConfig) on the runtime ``rt``'s device and backend; seed every RNG from ``seed``.

    Raises runtime.DeviceError when the device cannot be used or the ranks decided differently."""
    le = launch_env()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", le["master_addr"])
        os.environ.setdefault("MASTER_PORT", le["master_port"])
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = next(dist.rendezvous("env://", le["rank"], le["world_size"], timeout=timeout))
        store.set_timeout(timeout)
        runtime_mod.agree(store, rt, rank, world)
        runtime_mod.activate(rt)
        dist.init_process_group(backend=rt.backend, store=dist.PrefixStore("default_pg", store),
                                rank=rank, world_size=world, timeout=timeout)
    else:
        runtime_mod.activate(rt)
    le["runtime"] = rt
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
    )
    set_seed(seed)
    return le


def set_seed(seed: int) -> None:
    """Megatron's convention: a different seed per pipeline stage, TP handled by the RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# How long tearing the process groups down may take before the process ends itself (exit code 1).
DESTROY_TIMEOUT_S = 300.0


def destroy_distributed(timeout_s: float = DESTROY_TIMEOUT_S) -> None:
    """Tear down megatron's groups and the default process group.

    A teardown that hangs ends the process after ``timeout_s`` with every thread's stack on stderr and
    exit code 1, rather than holding the job and its allocation until the time limit (and keeping
    ``--slurm-requeue`` from requeueing it); checkpoints are written before this point. Seen: torch
    2.6's gloo group destructor deadlocks on the GIL against a worker thread still freeing a finished
    collective (torch 2.8 fixed it, pytorch#154976). The timer is faulthandler's, a C thread that needs
    no GIL."""
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()
