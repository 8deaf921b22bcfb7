"""Process-group set-up: one code path for torchrun's and SLURM's variables; the backend is the
runtime's (``tri_megatron.runtime``: NCCL on GPU, gloo on CPU and on the virtual device), agreed by
all ranks through the rendezvous store before the group is built."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from tri_megatron import runtime as runtime_mod


def launch_env(environ=None) -> dict:
    """Where this process sits, from torchrun's or SLURM's variables: the one place that reads them.

    torchrun (also torchrun inside an srun task): RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK,
    LOCAL_WORLD_SIZE. srun with one task per GPU: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    SLURM_NODEID, SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE. torchrun's win when both are set.
    MASTER_ADDR / MASTER_PORT come from the environment (the sbatch script sets them); under SLURM
    without them, the first host of SLURM_JOB_NODELIST and a port derived from SLURM_JOB_ID.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world, local = int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        node = int(env.get("GROUP_RANK", env.get("SLURM_NODEID", 0)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        node = int(env.get("SLURM_NODEID", 0))
        local_world = _slurm_tasks_on_this_node(env)
    else:
        launcher, rank, world, local, node, local_world = "single", 0, 1, 0, 0, 1
    master_addr = env.get("MASTER_ADDR")
    master_port = env.get("MASTER_PORT")
    if launcher == "slurm" and not master_addr and env.get("SLURM_JOB_NODELIST"):
        master_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if launcher == "slurm" and not master_port and env.get("SLURM_JOB_ID"):
        master_port = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return {
        "launcher": launcher,
        "rank": rank,
        "world_size": world,
        "local_rank": local,
        "local_world_size": local_world,
        "node_rank": node,
        "master_addr": master_addr or "127.0.0.1",
        "master_port": master_port or "29500",
    }


def _slurm_tasks_on_this_node(env) -> int:
    """SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE ('8(x64)' or '2,1')."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec, node = env.get("SLURM_TASKS_PER_NODE", ""), int(env.get("SLURM_NODEID", 0))
    counts = []
    for part in filter(None, spec.split(",")):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node] if node < len(counts) else 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames | head -1` prints it:
    'gpu[012-015,020],cpu1' -> 'gpu012', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
    head, depth = "", 0
    for ch in nodelist:  # the first top-level entry
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            break
        head += ch
    host = ""
    while "[" in head and "]" in head:
        prefix, rest = head.split("[", 1)
        ranges, head = rest.split("]", 1)
        host += prefix + ranges.split(",")[0].split("-")[0]
    return host + head


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


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
