"""torch.distributed on one host: a free TCP port for a rendezvous, and the one-process gloo group
(megatron-core's parallel state at TP=PP=1) that conversion, verification and in-process tests run in.

Multi-process runs initialise through ``tri_megatron.training.distributed``. This module imports only
the standard library at import time: ``tools/gpu_check.py`` uses ``free_port`` before megatron-core
is installed.
"""

from __future__ import annotations

import os
import socket

# What torchrun and srun set to place a process in a job; a helper process started from a rank (a
# background conversion) must not inherit them, or it would join its parent's launch.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")


def _ephemeral_ports() -> tuple:
    """The range the kernel takes ports from for bind(0) and outgoing connections (Linux's default if unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(p) for p in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` now ("" = every interface), for MASTER_PORT and the like.

    The caller binds it seconds later (after its imports). A port from the kernel's ephemeral range could be
    taken meanwhile by any socket of another process (gloo opens dozens per run): seen as EADDRINUSE when
    two test runs start together. So the port is drawn at random below that range, where the kernel never
    hands out ports by itself; only another caller drawing the same one could meet it."""
    import random

    low, _ = _ephemeral_ports()
    draw = random.SystemRandom()
    for _ in range(64 if low > 12000 else 0):
        port = draw.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use (or in TIME_WAIT): draw again
                continue
            return port
    with socket.socket() as s:  # an unusual range: leave it to the kernel
        s.bind((host, 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """Make this process a one-rank gloo group with megatron-core's parallel state at TP=PP=1 (model-parallel
    RNG seeded with 1), on the CPU shim where there is no CUDA device (``tri_megatron.compat``).

    What is initialised already is kept; raises RuntimeError when the process is part of a larger group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tri_megatron import compat

    compat.activate()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or dist.get_world_size() != 1:
        raise RuntimeError("a single-process megatron group (TP=PP=1) was asked for in a process of a larger group")
