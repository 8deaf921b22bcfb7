"""Where the CUDA toolkit is, and which GPU architectures to compile the Tri kernels for.

Shared by setup.py's build of ``tri_megatron._cuda_kernels`` (which loads this file by path, so it
imports only the standard library) and the JIT fallback in :mod:`tri_megatron.ops._kernels`.
Nothing here needs a GPU: a build node with a CUDA torch and nvcc is enough.

* :func:`resolve_cuda_home` -- ``CUDA_HOME`` / ``CUDA_PATH`` when set (it must hold ``bin/nvcc`` and
  the CUDA headers, else :class:`CudaHomeError` with the fix), otherwise the toolkit behind the
  ``nvcc`` on PATH (also when that ``nvcc`` is a wrapper script outside the toolkit), else
  ``/usr/local/cuda``, else a toolkit made of NVIDIA's pip wheels (:func:`pip_toolkit`;
  :func:`cudart_link_dirs` makes it link).
* :func:`default_arch_flags` -- nvcc ``-gencode`` flags for when ``TORCH_CUDA_ARCH_LIST`` is unset:
  sm_90 (H100 / H200), sm_100 (B200) when this nvcc knows it, and the GPUs visible now, plus PTX of
  the newest for GPUs after it. (torch's own default reads the visible GPUs only, and fails with
  none visible.)
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Mapping, Optional

DEFAULT_ARCHS = (90,)  # always compiled: the GPUs this project trains on
NEWER_ARCHS = (100,)  # added when nvcc can target them


class CudaHomeError(RuntimeError):
    """CUDA_HOME / CUDA_PATH is set but is not a CUDA toolkit."""


def _is_toolkit(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime_api.h"))


def _toolkit_of_nvcc(nvcc: str) -> Optional[str]:
    """The toolkit a ``nvcc`` on PATH belongs to: its parent dir, or (a wrapper script) where it execs."""
    for cand in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.path.dirname(os.path.dirname(nvcc))):
        if _is_toolkit(cand):
            return cand
    try:  # nvcc's dry run names its own bin directory: "#$ _HERE_=/usr/local/cuda-13.0/bin"
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"_HERE_=(\S+)", out)
    if m and _is_toolkit(os.path.dirname(m.group(1).rstrip("/"))):
        return os.path.dirname(m.group(1).rstrip("/"))
    return None


def resolve_cuda_home(environ: Optional[Mapping[str, str]] = None, which=shutil.which,
                      fallback: str = "/usr/local/cuda") -> Optional[str]:
    """The CUDA toolkit directory to build with, or None when there is no nvcc at all.

    Raises :class:`CudaHomeError` when CUDA_HOME (or CUDA_PATH) is set to a directory without
    ``bin/nvcc`` or ``include/cuda_runtime_api.h``: a wrong value is a mistake to report, not a
    reason to look elsewhere.
    """
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            missing = [p for p in ("bin/nvcc", "include/cuda_runtime_api.h")
                       if not os.path.isfile(os.path.join(home, p))]
            if missing:
                raise CudaHomeError(
                    f"{var}={home} does not contain {' or '.join(missing)}: set {var} to the CUDA toolkit "
                    f"directory (the one holding bin/nvcc and include/, e.g. /usr/local/cuda), or unset it to "
                    f"use the nvcc on PATH; TRI_SKIP_CUDA_BUILD=1 installs without the compiled kernels")
            return home
    nvcc = which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home:
            return home
    if fallback and _is_toolkit(fallback):
        return fallback
    return pip_toolkit()


def pip_toolkit(paths: Optional[Iterable[str]] = None) -> Optional[str]:
    """A toolkit assembled from NVIDIA's pip wheels (``nvidia/cu13``: nvidia-cuda-nvcc, -crt, -cccl and
    nvidia-nvvm beside the runtime headers a CUDA torch brings), for a node with no CUDA toolkit."""
    for base in (sys.path if paths is None else paths):
        for cand in sorted(glob.glob(os.path.join(base or ".", "nvidia", "cu[0-9]*")), reverse=True):
            if _is_toolkit(cand):
                return cand
    return None


def cudart_link_dirs(home: str) -> list[str]:
    """Extra linker dirs so that ``-lcudart`` resolves: pip's toolkit ships only ``libcudart.so.13``
    (no unversioned name), so point at a private dir holding the ``libcudart.so`` link. [] otherwise."""
    libs = [os.path.join(home, d) for d in ("lib64", "lib")]
    if any(os.path.exists(os.path.join(d, "libcudart.so")) for d in libs):
        return []
    versioned = sorted(glob.glob(os.path.join(libs[1], "libcudart.so.*")) + glob.glob(os.path.join(libs[0], "libcudart.so.*")))
    if not versioned:
        return []
    link_dir = os.path.join(tempfile.gettempdir(), f"tri_megatron_cudart_{os.getuid()}",
                            hashlib.sha1(versioned[0].encode()).hexdigest()[:12])
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "libcudart.so")
    if not os.path.exists(link):
        try:
            os.symlink(versioned[0], link)
        except FileExistsError:  # another rank made it
            pass
    return [link_dir]


def nvcc_archs(nvcc: str) -> Optional[set[int]]:
    """The compute capabilities this nvcc can target (``nvcc --list-gpu-arch``), e.g. {80, 90, 100};
    None when it cannot say (an nvcc older than the flag)."""
    try:
        res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = {int(m) for m in re.findall(r"compute_(\d+)", res.stdout)}
    return found if res.returncode == 0 and found else None


def default_archs(known: Optional[set[int]], visible: Iterable[int] = ()) -> list[int]:
    """sm_90, the newer ones ``known`` to nvcc, and the ``visible`` GPUs' (that nvcc knows), sorted."""
    archs = set(DEFAULT_ARCHS)
    if known:
        archs |= {a for a in NEWER_ARCHS if a in known}
        archs |= {a for a in visible if a in known}
    return sorted(archs)


def gencode_flags(archs: Iterable[int]) -> list[str]:
    """nvcc flags: SASS for each arch, PTX of the newest (JIT-compiled by the driver on later GPUs)."""
    archs = sorted(set(archs))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def default_arch_flags(nvcc: str, visible: Iterable[int] = ()) -> tuple[list[str], list[int]]:
    """(nvcc -gencode flags, archs) for a build with ``TORCH_CUDA_ARCH_LIST`` unset."""
    archs = default_archs(nvcc_archs(nvcc), visible)
    return gencode_flags(archs), archs
