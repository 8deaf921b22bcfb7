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

kernel_sources = sorted(glob.glob("csrc/kernels/*.cpp") + glob.glob("csrc/kernels/*.cu"))
if kernel_sources and os.environ.get("TRI_SKIP_CUDA_BUILD") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # torch absent at build time: kernels are JIT-loaded later
        torch = None
    if torch is not None and torch.version.cuda and CUDA_HOME:
        ext_modules.append(
            CUDAExtension(
                "tri_megatron._cuda_kernels",
                kernel_sources,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
        cmdclass["build_ext"] = BuildExtension

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
        "torch>=2.6",  # megatron-core's own floor; CI runs 2.13 (CPU), tools/gpu_check.py the GPU node's
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
        "test": ["pytest>=8", "transformers>=4.57,<5.25"],
        # Optional engines; never required. (Never `pip install apex`: that name is another package.)
        "te": ["transformer-engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"tri_megatron": ["convert/hf_modeling/*.py"]},
)
