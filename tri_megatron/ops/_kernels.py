"""Loader of the compiled CUDA kernels (csrc/kernels -> ``tri_megatron._cuda_kernels``), one decision
for the whole job.

Only where torch sees a CUDA device (else the references run: a CUDA torch with the extension built on
a GPU-less login node, or the tests' virtual device, whose tensors report ``is_cuda`` but live in host
memory). Each rank first tries, once per process:
1. the extension built by ``setup.py`` (present when the package was installed with a CUDA torch);
2. a just-in-time build of the kernel sources with ``torch.utils.cpp_extension.load`` (needs a CUDA
   torch, nvcc and ninja; cached in torch's extension dir). The sources are those of
   the checkout (editable install) or the copy that setup.py ships in the package
   (``tri_megatron/_csrc/kernels``, non-editable install);
3. ``None``: every op then runs its PyTorch reference.

In a job of several ranks that local result is not used alone: :func:`agree_on_kernels` (called by the
model builder on every rank, after ``torch.distributed`` is initialised) gathers it from every rank,
and the kernels are on only when they loaded on all of them. If some ranks failed (a JIT build that
broke on one node, ``TRI_DISABLE_CUDA_KERNELS`` set on some), every rank uses the references and
rank 0 says so loudly, naming the ranks: the references compute the same values and gradients (the
kernel tests hold them to it), so the job stays correct, only slower, whereas ranks on different
paths would build different graphs and hang. Before that agreement, asking for the kernels in a
multi-rank job raises.

``TRI_DISABLE_CUDA_KERNELS=1`` forces (3) (for A/B checks); ``TRI_NO_JIT_KERNELS=1`` skips (2).
Ops call :func:`use_kernels_for` only for CUDA tensors, so CPU runs never trigger a build.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
from types import ModuleType
from typing import Optional

import torch

__all__ = ["agree_on_kernels", "get_kernels", "kernels_available", "kernel_source_dir", "kernel_sources",
           "use_kernels_for"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "agreed": False}

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../tri_megatron
_SOURCE_DIRS = (os.path.join(_PACKAGE, "_csrc", "kernels"),  # shipped by setup.py's build_py
                os.path.join(os.path.dirname(_PACKAGE), "csrc", "kernels"))  # the checkout


def kernel_source_dir() -> Optional[str]:
    """Directory of the kernel sources: the copy in the installed package, else the checkout's csrc."""
    for d in _SOURCE_DIRS:
        if glob.glob(os.path.join(d, "*.cu")):
            return d
    return None


def kernel_sources() -> list[str]:
    """The .cpp and .cu sources of the extension (what setup.py and the JIT build compile)."""
    d = kernel_source_dir()
    if d is None:
        return []
    return sorted(glob.glob(os.path.join(d, "*.cpp")) + glob.glob(os.path.join(d, "*.cu")))


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    from tri_megatron.ops._cuda_build import cudart_link_dirs, resolve_cuda_home

    sources = kernel_sources()
    if not sources:
        raise RuntimeError(f"no kernel sources in {' or '.join(_SOURCE_DIRS)}")
    home = resolve_cuda_home()  # raises on a CUDA_HOME that is not a toolkit
    if home is None:
        raise RuntimeError("no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): cannot JIT-build the Tri kernels")
    cpp_extension.CUDA_HOME = home  # torch guessed it at import (e.g. /usr/local from a wrapper nvcc)
    return cpp_extension.load(
        name="tri_megatron_cuda_kernels",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        extra_ldflags=[f"-L{d}" for d in cudart_link_dirs(home)],
        extra_include_paths=[os.path.dirname(sources[0])],
        verbose=os.environ.get("TRI_KERNELS_VERBOSE") == "1",
    )


def _load() -> Optional[ModuleType]:
    if os.environ.get("TRI_DISABLE_CUDA_KERNELS") == "1":
        _state["error"] = RuntimeError("TRI_DISABLE_CUDA_KERNELS=1")
        return None
    if not torch.cuda.is_available():  # e.g. a CUDA torch with the extension built, on a login node: the
        # kernels cannot run, and the tests' virtual device (is_cuda tensors in host memory) must get the
        # references, so the extension is not even imported
        _state["error"] = RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        return None
    try:
        from tri_megatron import _cuda_kernels  # type: ignore[attr-defined]

        return _cuda_kernels
    except ImportError as exc:
        _state["error"] = exc
    if os.environ.get("TRI_NO_JIT_KERNELS") == "1":
        return None
    if not torch.version.cuda:  # a device, but not CUDA's (a ROCm build): nothing to build with nvcc
        _state["error"] = RuntimeError(f"no prebuilt extension ({_state['error']}) and no JIT build: torch "
                                       f"{torch.__version__} is not a CUDA build")
        return None
    try:
        _log.info("JIT-building the tri_megatron CUDA kernels (first use; cached by torch afterwards)")
        return _jit_build()
    except Exception as exc:  # a failed build falls back to the references, loudly
        _state["error"] = exc
        _log.warning("tri_megatron CUDA kernels unavailable on this rank (JIT build failed: %s); "
                     "using the PyTorch reference ops", exc)
        return None


def _local_kernels() -> Optional[ModuleType]:
    """This process's own attempt (once), before any agreement between ranks."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"] = _load()
                _state["tried"] = True
    return _state["module"]


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_on_kernels() -> bool:
    """Make the kernel decision one for all ranks; returns whether the kernels are on.

    A collective over the default process group the first time it runs in a multi-rank job, so every
    rank must call it, at the same point (the model builder does, before building); afterwards, and
    in a single process, it only returns the decision.
    """
    if _state["agreed"]:
        return _state["module"] is not None
    local = _local_kernels()
    if _multi_rank():
        import torch.distributed as dist

        backend = str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        flag = torch.tensor([1 if local is not None else 0], dtype=torch.int32, device=device)
        flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, flag)
        loaded = [int(f.item()) for f in flags]
        if min(loaded) != max(loaded):
            missing = [r for r, ok in enumerate(loaded) if not ok]
            msg = (f"the Tri CUDA kernels loaded on {sum(loaded)} of {len(loaded)} ranks only (not on ranks "
                   f"{_ranks(missing)}; each says why in its own log): ALL ranks now use the PyTorch reference "
                   f"ops (same results, slower). Fix the kernel build on those nodes (pip install . there with "
                   f"nvcc and a CUDA torch, or a valid CUDA_HOME for the JIT build), or set "
                   f"TRI_DISABLE_CUDA_KERNELS=1 on every rank to silence this.")
            if local is None:
                _log.warning("tri_megatron kernels on this rank: %s", _state["error"])
            if dist.get_rank() == 0:
                bar = "!" * 100
                print(f"\n{bar}\ntri_megatron WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)
                _log.warning(msg)
            _state["module"] = None
            _state["error"] = RuntimeError(msg)
    _state["agreed"] = True
    return _state["module"] is not None


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f", ... ({len(ranks)} ranks)" if len(ranks) > 16 else "")


def get_kernels() -> Optional[ModuleType]:
    """The kernel extension module, or None when the references are to be used.

    In a multi-rank job only after :func:`agree_on_kernels` (else RuntimeError): one rank's own
    success must never put it on a different path from the others.
    """
    if not _state["agreed"] and _multi_rank():
        raise RuntimeError("tri_megatron: the CUDA kernels were asked for before agree_on_kernels() ran; in a "
                           "multi-rank job every rank must call it after torch.distributed is initialised "
                           "(tri_megatron.model.builder does, before building the model)")
    return _local_kernels()


def kernels_available() -> bool:
    """True when the CUDA kernels are on (loaded here and, in a multi-rank job, on every rank)."""
    return get_kernels() is not None


def use_kernels_for(*tensors: Optional[torch.Tensor]) -> Optional[ModuleType]:
    """The kernel module when every given tensor is on CUDA and the kernels are on, else None."""
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return None
    return get_kernels()
