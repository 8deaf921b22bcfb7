"""Shared fixtures: tests import the helper in tests/launcher.py; megatron-core on CPU in-process."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def megatron_single_process():
    """A one-process gloo group with megatron-core's parallel state at TP=PP=1, on CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tri_megatron import compat
    from launcher import free_port

    compat.activate()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1)
    yield
