"""Loader of the compiled CUDA kernels (csrc/kernels -> ``tri_megatron._cuda_kernels``).

Order of attempts, once per process:
1. the extension built by ``setup.py`` (present when the package was installed with a CUDA torch);
2. a just-in-time build of ``csrc/kernels/*.cpp`` + ``*.cu`` with ``torch.utils.cpp_extension.load``
   (needs a CUDA torch, a visible GPU, nvcc via ``CUDA_HOME`` and ninja; cached in torch's extension dir);
3. ``None``: every op then runs its PyTorch reference.

``TRI_DISABLE_CUDA_KERNELS=1`` forces (3) (for A/B checks); ``TRI_NO_JIT_KERNELS=1`` skips (2).
Ops call :func:`get_kernels` only for CUDA tensors, so CPU runs never trigger a build.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from types import ModuleType
from typing import Optional

import torch

__all__ = ["get_kernels", "kernels_available", "kernel_sources", "use_kernels_for"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "csrc", "kernels")


def kernel_sources() -> list[str]:
    """The .cpp and .cu sources of the extension (what setup.py and the JIT build compile)."""
    return sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = kernel_sources()
    if not sources:
        raise RuntimeError(f"no kernel sources under {_CSRC}")
    return load(
        name="tri_megatron_cuda_kernels",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        extra_include_paths=[_CSRC],
        verbose=os.environ.get("TRI_KERNELS_VERBOSE") == "1",
    )


def _load() -> Optional[ModuleType]:
    if os.environ.get("TRI_DISABLE_CUDA_KERNELS") == "1":
        return None
    try:
        from tri_megatron import _cuda_kernels  # type: ignore[attr-defined]

        return _cuda_kernels
    except ImportError as exc:
        _state["error"] = exc
    if os.environ.get("TRI_NO_JIT_KERNELS") == "1":
        return None
    if not (torch.version.cuda and torch.cuda.is_available()):
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME:
        _state["error"] = RuntimeError("CUDA_HOME not found: cannot JIT-build the Tri kernels")
        return None
    try:
        _log.info("JIT-building the tri_megatron CUDA kernels (first use; cached by torch afterwards)")
        return _jit_build()
    except Exception as exc:  # a failed build falls back to the references, loudly
        _state["error"] = exc
        _log.warning("tri_megatron CUDA kernels unavailable (JIT build failed: %s); "
                     "using the PyTorch reference ops", exc)
        return None


def get_kernels() -> Optional[ModuleType]:
    """The kernel extension module, or None when it cannot be loaded (then use the references)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"] = _load()
                _state["tried"] = True
    return _state["module"]


def kernels_available() -> bool:
    """True when the CUDA kernels are loaded (or loadable) in this process."""
    return get_kernels() is not None


def use_kernels_for(*tensors: Optional[torch.Tensor]) -> Optional[ModuleType]:
    """The kernel module when every given tensor is on CUDA and the kernels load, else None."""
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return None
    return get_kernels()
