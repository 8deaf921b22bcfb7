"""Run megatron-core on CPU under gloo when no CUDA device is present (tests, quickstart).

megatron-core hard-codes CUDA in two ways: tensor factories with ``device="cuda"`` /
``torch.cuda.current_device()`` and ``.cuda()`` calls, and direct calls into ``torch.cuda``
(RNG state, synchronize, memory statistics). ``activate()`` redirects both to the CPU:

* a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument of a torch call to ``cpu`` and makes
  ``Tensor.cuda`` a no-op; ``Tensor.type()`` names CPU tensors as CUDA ones;
* a handful of ``torch.cuda`` functions get CPU stand-ins, and ``torch.Generator(device="cuda")`` is
  a host generator;
* megatron's CUDA RNG tracker helpers use the CPU generator.

``activate(virtual=True)`` adds the virtual accelerator (``virtual.py``): what is sent to "cuda" is
tracked and may not meet host tensors, so the CPU tests catch what a GPU would reject.

Only the runtime (``tri_megatron.runtime``) decides to call it, and never where CUDA is usable, so a
GPU run is never altered. Call it once, before megatron-core builds anything; it is idempotent.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from tri_megatron.compat import virtual

_ACTIVE = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda...`` (and integer CUDA device indices) in torch calls to ``cpu``;
    in virtual mode hands the call to ``virtual.handle_function`` first."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory:  # no pinned-memory allocator without CUDA
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if virtual.enabled():
            out = virtual.handle_function(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and (_is_cuda_device(dev) or isinstance(dev, int)):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to or func is torch.Tensor.new_empty:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def cpu_mode_active() -> bool:
    """True once ``activate()`` has redirected megatron-core to the CPU."""
    return _ACTIVE


def mode():
    """None (not active: real CUDA or nothing set up), "cpu" or "virtual"."""
    if not _ACTIVE:
        return None
    return "virtual" if virtual.enabled() else "cpu"


def activate(virtual_device: bool = False) -> bool:
    """Install the CPU redirections if (and only if) CUDA is unavailable. Returns whether active.

    virtual_device: also switch on the virtual accelerator (see ``virtual.py``)."""
    # One list of redirections installed together (and undone together by tests); kept in one place on purpose.
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    if virtual_device:
        virtual.enable()
    if _ACTIVE:
        return True

    mode = _CudaToCpuMode()
    mode.__enter__()  # global for the process: megatron builds tensors everywhere
    _keep_mode_in_backward(mode)

    # megatron's optimizer asserts grad.type() == 'torch.cuda.FloatTensor' (and the bf16/half
    # variants): report CPU tensors under their CUDA type names when asked with no argument.
    _type = torch.Tensor.type

    def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return _type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _cuda_named_type  # type: ignore[assignment]

    torch.Generator = _HostGenerator  # type: ignore[misc]

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

    from tri_megatron.mcore_internals import route_rng_tracker_to_host

    route_rng_tracker_to_host()  # the tracker's private generator hooks, and its host-state warning

    _ACTIVE = True
    return True


class _HostGenerator(torch.Generator):
    """``torch.Generator(device="cuda")`` is a host generator (the host stands in for the device)."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu" if _is_cuda_device(device) or isinstance(device, int) else device)

    def __init__(self, device="cpu"):
        pass


def _keep_mode_in_backward(mode) -> None:
    """A function mode is popped while it handles a call, so ``torch.autograd.backward`` (which it
    intercepts) would run every backward function -- megatron's autograd Functions allocate with
    ``device=torch.cuda.current_device()`` there -- without the redirection. The autograd engine is
    entered through ``_engine_run_backward``: put the mode back around it."""
    import torch.autograd
    import torch.autograd.graph

    from torch.overrides import _get_current_function_mode_stack

    run = torch.autograd.graph._engine_run_backward

    def engine_run_backward_with_mode(*args, **kwargs):
        if any(m is mode for m in _get_current_function_mode_stack()):
            return run(*args, **kwargs)
        with mode:
            return run(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = engine_run_backward_with_mode
    torch.autograd._engine_run_backward = engine_run_backward_with_mode


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
