"""The virtual accelerator: a "cuda" device emulated in host memory, for CPU tests of the GPU path.

On a machine without CUDA the CPU shim (``cpu.py``) lets megatron-core run by sending everything
that asks for ``cuda`` to the host. That hides exactly the bugs a first GPU run meets: a batch left on
the host, a model that was never moved, a buffer created with the default device. In virtual mode
the device is no longer the host: every tensor is still a CPU tensor underneath, but those created
*for the device* are tracked, and any aten op that mixes a device tensor with a host tensor raises
``DeviceMismatchError``, as CUDA raises "Expected all tensors to be on the same device".

What is a device tensor: one whose *storage* is tracked (so views, ``.data`` swaps and megatron's
grad-buffer views follow their storage, as on a GPU). A storage becomes tracked when

* a torch call is asked for ``device="cuda"`` / ``cuda:N`` / an integer index (factories,
  ``torch.tensor``, ``torch.as_tensor`` (copied if it would alias a host tensor), ``new_*``);
* ``t.cuda()`` / ``t.to("cuda")`` / ``t.to(device_tensor)`` copies a host tensor (a new storage);
* an aten op has a device tensor among its inputs (its outputs are device tensors) -- forward and
  backward alike, since autograd's backward ops pass through the same dispatch mode.

``t.cpu()`` / ``t.to("cpu")`` of a device tensor return an untracked copy. Tracked tensors report
``t.device == cuda:0``, ``t.is_cuda``, ``t.get_device() == 0`` (so ``torch.empty(..., device=x.device)``
lands on the device, as on a GPU) and refuse ``t.numpy()``. Mixing rules follow CUDA's: 0-dim host
tensors are scalars and may meet device tensors; ``copy_`` / ``_to_copy`` cross devices; indexing a
device tensor with host indices is allowed.

What it does not model: memory limits, streams and asynchrony (the CPU shim's streams and events
are no-ops); NCCL itself (collectives run on gloo, on the host storage of device tensors, so a host
tensor handed alone to a collective is not caught, and code that picks its device from
``dist.get_backend() == "nccl"`` takes its gloo branch -- read ``tri_megatron.runtime.current().device``
instead); ``torch.cuda.is_available()`` stays False (the truth: torch's own CUDA branches must not run);
``torch.save`` records device tensors as CPU ones; and C++ code that decides by the real device (it sees
CPU tensors: e.g. SDPA picks its CPU kernels). One such case is modelled: the tensors SDPA creates
inside itself (torch 2.6's math path builds its causal mask with its inputs' options) are device
tensors when its inputs are, as on a GPU.

Two modes implement it, both pushed by ``enable()``: a ``TorchFunctionMode`` (device arguments,
``.cuda/.cpu/.to``, the ``device``/``is_cuda`` getters) and a ``TorchDispatchMode`` at aten level
(the mixing check and the propagation). Tracking is a table keyed by the storage's C++ address with a
weak reference to it: the weak reference keeps the address from being reused while the entry lives.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

DEVICE = torch.device("cuda", 0)


class DeviceMismatchError(RuntimeError):
    """An op mixed virtual-device tensors with host tensors: on a GPU this raises too."""


_tracked: dict = {}  # storage address -> StorageWeakRef
_marks_since_prune = 0
_inside_device_composite = 0  # > 0 while a composite op with device inputs runs (see _COMPOSITES)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # no storage (e.g. sparse): never a device tensor
        return None


def is_device_tensor(t) -> bool:
    """Whether t lives on the virtual device (its storage is tracked)."""
    if not isinstance(t, torch.Tensor):
        return False
    key = _storage_key(t)
    return key is not None and key in _tracked


def mark(t: torch.Tensor) -> torch.Tensor:
    """Put t's storage on the virtual device (in place); returns t."""
    global _marks_since_prune
    key = _storage_key(t)
    if key is not None and key not in _tracked:
        _tracked[key] = StorageWeakRef(t.untyped_storage())
        _marks_since_prune += 1
        if _marks_since_prune > 20000:
            _prune()
    return t


def unmark(t: torch.Tensor) -> torch.Tensor:
    key = _storage_key(t)
    if key is not None:
        _tracked.pop(key, None)
    return t


def _prune() -> None:
    global _marks_since_prune
    for key in [k for k, ref in _tracked.items() if ref.expired()]:
        del _tracked[key]
    _marks_since_prune = 0


def tracked_storages() -> int:
    """Live device storages (for tests)."""
    _prune()
    return len(_tracked)


def _describe(t: torch.Tensor) -> str:
    return f"host tensor of shape {list(t.shape)} ({str(t.dtype).replace('torch.', '')})"


# Ops that legitimately take tensors on two devices (as CUDA allows them).
_CROSS_DEVICE = {
    aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
    aten._index_put_impl_.default, aten._unsafe_index.Tensor, aten._unsafe_index_put.default,
    aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.set_.source_Tensor,
}
# In-place/out ops whose result keeps its own device whatever the source's.
_KEEPS_DESTINATION = {aten.copy_.default, aten.set_.source_Tensor}


class TrackDeviceTensors(TorchDispatchMode):
    """aten level: rejects ops mixing device and host tensors; outputs of device inputs are device tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device, host = False, None
        for a in _tensors(args, kwargs.values()):
            if is_device_tensor(a):
                on_device = True
            elif a.dim() > 0 and host is None and a.device.type == "cpu":
                host = a
        if on_device and host is not None and func not in _CROSS_DEVICE:
            raise DeviceMismatchError(
                f"virtual device: {func} mixes device tensors with a {_describe(host)}; on a GPU this fails "
                f"with 'Expected all tensors to be on the same device': create it on, or move it to, the "
                f"runtime device"
            )
        out = func(*args, **kwargs)
        if _inside_device_composite and host is None and not on_device:
            on_device = not any(True for _ in _tensors(args, kwargs.values()))  # a factory: its inputs' options
        if on_device and func not in _KEEPS_DESTINATION:
            for o in _tensors((out,)):
                mark(o)
        return out


def _tensors(*groups):
    """The tensors among aten arguments/results: top level, or inside one list/tuple level (aten's
    Tensor[] / Tensor?[]) -- cheaper than a pytree flatten on every op."""
    for group in groups:
        for a in group:
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor):
                        yield b


def _target_is_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


def _copy_to_device(t: torch.Tensor, **to_kwargs) -> torch.Tensor:
    out = t.to(device="cpu", copy=True, **to_kwargs)
    return mark(out)


def _copy_to_host(t: torch.Tensor, **to_kwargs) -> torch.Tensor:
    out = t.to(device="cpu", copy=True, **to_kwargs)
    return unmark(out)


# property getters reach a function mode as the descriptor's bound __get__ (a new object each time)
_DEVICE_DESC, _IS_CUDA_DESC, _IS_CPU_DESC = torch.Tensor.device, torch.Tensor.is_cuda, torch.Tensor.is_cpu
_NEW_FACTORIES = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
                  torch.Tensor.new_tensor, torch.Tensor.new_empty_strided}


# C++ composite ops whose internal temporaries are created with their inputs' options (device).
_COMPOSITES = {torch.nn.functional.scaled_dot_product_attention}


def handle_function(func, args, kwargs):
    """The TorchFunctionMode side of virtual mode: returns NotImplemented for calls it leaves alone.

    Called by the CPU shim's function mode (``cpu._HostFunctionMode``) when virtual mode is on; device
    arguments have not been rewritten yet.
    """
    owner = getattr(func, "__self__", None)
    if owner is _DEVICE_DESC:
        return DEVICE if is_device_tensor(args[0]) else func(*args)
    if owner is _IS_CUDA_DESC:
        return is_device_tensor(args[0])
    if owner is _IS_CPU_DESC:
        return not is_device_tensor(args[0]) and func(*args)
    if func is torch.Tensor.get_device:
        return 0 if is_device_tensor(args[0]) else func(*args)
    if func is torch.Tensor.numpy and is_device_tensor(args[0]):
        raise DeviceMismatchError("virtual device: can't convert a device tensor to numpy; use .cpu() first "
                                  "(as on a GPU)")
    if func is torch.Tensor.cuda:
        t = args[0]
        if is_device_tensor(t):
            return t
        nb = kwargs.get("non_blocking", False)
        return _copy_to_device(t, non_blocking=nb)
    if func is torch.Tensor.cpu:
        t = args[0]
        return _copy_to_host(t) if is_device_tensor(t) else func(*args, **kwargs)
    if func is torch.Tensor.to:
        return _to(args, kwargs, func)
    dev = kwargs.get("device")
    if dev is not None and _target_is_device(dev):
        kwargs = dict(kwargs, device="cpu")
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        hosts = {_storage_key(a) for a in _tensors(args)}
        if _storage_key(out) in hosts and not is_device_tensor(out):
            out = out.clone()  # as_tensor of a host tensor aliases it: the device gets a copy
        return mark(out)
    if func in _NEW_FACTORIES and dev is None and is_device_tensor(args[0]):
        out = func(*args, **kwargs)
        return mark(out)
    if func in _COMPOSITES and any(is_device_tensor(a) for a in _tensors(args, kwargs.values())):
        global _inside_device_composite
        _inside_device_composite += 1
        try:
            return func(*args, **kwargs)
        finally:
            _inside_device_composite -= 1
    return NotImplemented


def _to(args, kwargs, func):
    t, rest = args[0], args[1:]
    if rest and isinstance(rest[0], torch.Tensor):  # t.to(other): other's device and dtype
        other = rest[0]
        target = "cuda" if is_device_tensor(other) else "cpu"
        kw = dict(dtype=other.dtype, non_blocking=kwargs.get("non_blocking", rest[1] if len(rest) > 1 else False))
        copy = kwargs.get("copy", rest[2] if len(rest) > 2 else False)
    else:
        kw = dict(kwargs)
        copy = kw.pop("copy", False)
        if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool):
            rest = (f"cuda:{rest[0]}", *rest[1:])  # t.to(0): a CUDA index
        if len(rest) > 1 and isinstance(rest[-1], bool) and len(rest) == (4 if not isinstance(rest[0], torch.dtype) else 3):
            copy, rest = rest[-1], rest[:-1]  # positional copy: to(device, dtype, non_blocking, copy) / to(dtype, nb, copy)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kw)
        if device is None:
            return func(*args, **kwargs)
        target = "cuda" if device.type == "cuda" else device.type
        kw = dict(dtype=dtype, non_blocking=non_blocking)
        if memory_format is not None:
            kw["memory_format"] = memory_format
    if target == "cuda":
        if is_device_tensor(t):
            return t.to(device="cpu", copy=copy, **kw)  # dtype change (or itself), tracked by propagation
        return _copy_to_device(t, **kw)
    if target == "cpu" and is_device_tensor(t):
        return _copy_to_host(t, **kw)
    return func(*args, **kwargs)


_DISPATCH_MODE = None


def enable() -> None:
    """Push the aten-level tracking mode (the function-mode side is switched on by the CPU shim)."""
    global _DISPATCH_MODE
    if _DISPATCH_MODE is None:
        _DISPATCH_MODE = TrackDeviceTensors()
        _DISPATCH_MODE.__enter__()


def disable() -> None:
    global _DISPATCH_MODE
    if _DISPATCH_MODE is not None:
        _DISPATCH_MODE.__exit__(None, None, None)
        _DISPATCH_MODE = None


def enabled() -> bool:
    return _DISPATCH_MODE is not None
