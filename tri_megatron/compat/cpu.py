"""Run megatron-core on CPU under gloo when no CUDA device is present (tests, quickstart).

megatron-core hard-codes CUDA in two ways: tensor factories with ``device="cuda"`` /
``torch.cuda.current_device()`` and ``.cuda()`` calls, and direct calls into ``torch.cuda``
(RNG state, synchronize, memory statistics). ``activate()`` redirects both to the CPU:

* a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument of a torch call to ``cpu``;
* ``torch.Tensor.cuda`` becomes a no-op and ``Tensor.type()`` names CPU tensors as CUDA ones;
* a handful of ``torch.cuda`` functions get CPU stand-ins;
* megatron's CUDA RNG tracker helpers use the CPU generator.

It does nothing when CUDA is available, so a GPU run is never altered. Call it once, before
megatron-core builds anything; it is idempotent.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda...`` (and integer CUDA device indices) in torch calls to ``cpu``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and (_is_cuda_device(dev) or isinstance(dev, int)):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to or func is torch.Tensor.new_empty:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def cpu_mode_active() -> bool:
    """True once ``activate()`` has redirected megatron-core to the CPU."""
    return _ACTIVE


def activate() -> bool:
    """Install the CPU redirections if (and only if) CUDA is unavailable. Returns whether active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    _CudaToCpuMode().__enter__()  # global for the process: megatron builds tensors everywhere

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    # megatron's optimizer asserts grad.type() == 'torch.cuda.FloatTensor' (and the bf16/half
    # variants): report CPU tensors under their CUDA type names when asked with no argument.
    _type = torch.Tensor.type

    def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return _type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _cuda_named_type  # type: ignore[assignment]

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    # The CPU generator stands in for the CUDA one, so megatron's RNG tracker forks it as it would
    # fork the GPU's (the data-parallel stream stays on the default generator).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls this; the CPU is seeded already
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = _NullEvent  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()

    # The tracker's fork swaps the (CPU) generator on purpose here; its warning would be noise.
    logging.getLogger(mpu_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    _ACTIVE = True
    return True


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0
