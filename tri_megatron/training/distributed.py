"""Process-group set-up: one code path for torchrun's and SLURM's variables, gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from tri_megatron import compat


def launch_env() -> dict:
    """rank, world_size, local_rank, master addr/port from torchrun or SLURM (torchrun wins)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    return {
        "rank": rank,
        "world_size": world,
        "local_rank": local,
        "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
        "master_port": env.get("MASTER_PORT", "29500"),
    }


def init_distributed(args) -> dict:
    """Initialise torch.distributed and megatron-core's parallel state; seed every RNG."""
    le = launch_env()
    on_cpu = compat.activate()
    if not on_cpu:
        torch.cuda.set_device(le["local_rank"] % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", le["master_addr"])
        os.environ.setdefault("MASTER_PORT", le["master_port"])
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=le["rank"],
            world_size=le["world_size"],
            timeout=datetime.timedelta(minutes=30),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    set_seed(args.seed)
    return le


def set_seed(seed: int) -> None:
    """Megatron's convention: a different seed per pipeline stage, TP handled by the RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
