"""Installs tri_megatron.

Builds the C++ data helpers (pybind11, csrc/data/*.cpp -> tri_megatron._data_helpers) always, and the
CUDA kernels (csrc/kernels/*.cu + *.cpp -> tri_megatron._cuda_kernels) only when a CUDA build of torch
and nvcc are present. Install with `pip install --no-build-isolation -e .` after torch, so that the
build sees the torch you run with (tools/setup_env.sh does this).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

data_sources = sorted(glob.glob("csrc/data/*.cpp"))
if data_sources:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "tri_megatron._data_helpers", data_sources, cxx_std=17, extra_compile_args=["-O3"]
        )
    )
    cmdclass["build_ext"] = build_ext

# ---- CUDA kernels (csrc/kernels -> tri_megatron._cuda_kernels); needs a CUDA torch + nvcc, no GPU ----
def _cuda_kernel_build():
    """(CUDAExtension, BuildExtension) for the Tri kernels, or None when they are not compiled now (no
    CUDA torch, no nvcc, TRI_SKIP_CUDA_BUILD=1: then they JIT-build at first GPU use, or the PyTorch
    references run). No GPU needed. A CUDA_HOME that is not a toolkit (no bin/nvcc or headers) stops
    the install with exit code 2. Without TORCH_CUDA_ARCH_LIST the archs are sm_90, sm_100 where nvcc
    knows it, and the visible GPUs' (tri_megatron/ops/_cuda_build.py)."""
    import importlib.util
    import sys

    sources = sorted(glob.glob("csrc/kernels/*.cpp") + glob.glob("csrc/kernels/*.cu"))
    if not sources or os.environ.get("TRI_SKIP_CUDA_BUILD") == "1":
        return None
    try:
        import torch
    except ImportError:  # torch absent at build time: kernels are JIT-loaded later
        return None
    if not torch.version.cuda:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_tri_cuda_build", os.path.join(here, "tri_megatron", "ops", "_cuda_build.py"))
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    try:
        home = cuda_build.resolve_cuda_home()
    except cuda_build.CudaHomeError as exc:
        sys.stderr.write(f"setup.py: {exc}\n")
        sys.exit(2)
    if home is None:
        print("setup.py: torch is a CUDA build but no nvcc was found (CUDA_HOME, PATH, /usr/local/cuda, pip's "
              "nvidia-cuda-nvcc): the "
              "CUDA kernels are not compiled now (JIT-built at first GPU use where nvcc is, else PyTorch references)")
        return None
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home  # torch guessed it at import, e.g. /usr/local from a /usr/local/bin/nvcc wrapper
    nvcc_flags = ["-O3", "--use_fast_math"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = [a * 10 + b for a, b in map(torch.cuda.get_device_capability, range(torch.cuda.device_count()))]
        flags, archs = cuda_build.default_arch_flags(os.path.join(home, "bin", "nvcc"), visible)
        nvcc_flags += flags
        print(f"setup.py: TORCH_CUDA_ARCH_LIST unset: compiling the CUDA kernels for "
              f"{', '.join(f'sm_{a}' for a in archs)} (+PTX) with {home}/bin/nvcc")
    ext = cpp_extension.CUDAExtension("tri_megatron._cuda_kernels", sources,
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
                                      library_dirs=cuda_build.cudart_link_dirs(home))
    return ext, cpp_extension.BuildExtension


from setuptools.command.build_py import build_py as _build_py  # noqa: E402


class _BuildPyWithKernelSources(_build_py):
    """Also ships csrc/kernels as tri_megatron/_csrc/kernels, for the JIT build of a non-editable install."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "tri_megatron", "_csrc", "kernels")
        os.makedirs(dst, exist_ok=True)
        for src in sorted(glob.glob("csrc/kernels/*")):
            if os.path.splitext(src)[1] in (".cu", ".cuh", ".cpp", ".h"):
                self.copy_file(src, os.path.join(dst, os.path.basename(src)))


cmdclass["build_py"] = _BuildPyWithKernelSources
_kernel_build = _cuda_kernel_build()
if _kernel_build is not None:
    ext_modules.append(_kernel_build[0])
    cmdclass["build_ext"] = _kernel_build[1]

setup(
    name="tri_megatron",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining of the Tri LLM family on megatron-core",
    packages=find_packages(include=["tri_megatron", "tri_megatron.*"]),
    # Ranges are the ones CI tests: the lock (constraints.txt) holds one end, .ci/constraints-ends.txt the
    # other (see .ci/run). Wide where a cluster's container decides the version (torch, megatron-core):
    # installing tri_megatron must never replace those.
    python_requires=">=3.11",
    install_requires=[
        # megatron-core's own floor. CI runs 2.13 (CPU), tools/gpu_check.py the GPU node's. Run by hand
        # (2026-11-30): 2.11+cu130 and 2.6+cu124 pass the whole suite. Under 2.6 one 2-rank gloo run hung
        # once in ProcessGroupGloo's destructor (it holds the GIL; fixed in torch 2.8, pytorch#154976)
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",  # CI: 0.16.1 (lock) and 0.19.0 (ends)
        "numpy>=1.26",
        "pybind11>=2.12",
        "tensorboard>=2.16",
        "tokenizers>=0.22,<0.24",  # CI: 0.23.3 (lock), 0.22.x (ends, with transformers 4.57)
        "safetensors>=0.4.3",
        "pyyaml>=6",
        "tqdm",
        "psutil>=5.9",  # dist_checkpointing's writer needs it
    ],
    extras_require={
        # CI: 5.24.0 (lock) and 4.57.6 (ends); the KV-cache API of the export's modeling code is version-specific
        "hf": ["transformers>=4.57,<5.25"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.57,<5.25"],  # tests/run_tests.sh: 2 workers
        # Optional engines; never required. (Never `pip install apex`: that name is another package.)
        "te": ["transformer-engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"tri_megatron": ["convert/hf_modeling/*.py"]},
)
