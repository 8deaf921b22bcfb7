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
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "pybind11>=2.12",
        "tensorboard",
        "tokenizers>=0.19",
        "safetensors",
        "pyyaml",
        "tqdm",
        "psutil",  # dist_checkpointing's writer needs it
    ],
    extras_require={
        "hf": ["transformers>=4.45"],
        "test": ["pytest", "transformers>=4.45"],
        # Optional engines; never required. (Never `pip install apex`: that name is another package.)
        "te": ["transformer-engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"tri_megatron": ["convert/hf_modeling/*.py"]},
)
