"""Shared fixtures: tests import the helper in tests/launcher.py; megatron-core on CPU in-process.

The virtual accelerator (tri_megatron/compat/virtual.py): every training process the tests launch
(tests/launcher.py: parity, resume, conversion, SLURM, ...) runs with TRI_VIRTUAL_DEVICE=1, i.e.
``--device auto`` resolves to a "cuda" device emulated in host memory that rejects host tensors, so the
GPU code path (model and batches on the device, no use_cpu_initialization) is what CI exercises.
``TRI_VIRTUAL_DEVICE=0 pytest ...`` runs them on the plain CPU path instead. In-process tests run on
the plain CPU shim (``megatron_single_process``) unless they ask for ``virtual_device``.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TRI_VIRTUAL_DEVICE", "1")


def pytest_report_header(config):
    on = os.environ.get("TRI_VIRTUAL_DEVICE") == "1"
    return f"tri_megatron: launched training runs on the {'virtual CUDA device' if on else 'plain CPU path'} " \
           f"(TRI_VIRTUAL_DEVICE={os.environ.get('TRI_VIRTUAL_DEVICE')})"


@pytest.fixture(scope="session")
def megatron_single_process():
    """A one-process gloo group with megatron-core's parallel state at TP=PP=1, on CPU."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tri_megatron.local_dist import init_single_process

    init_single_process()
    model_parallel_cuda_manual_seed(1)  # also when a test in this process initialised the group before
    yield


@pytest.fixture
def virtual_device(megatron_single_process):
    """The virtual accelerator in this process for one test: "cuda" tensors are tracked and may not
    meet host tensors. Yields the virtual runtime (tri_megatron.runtime.Runtime)."""
    from tri_megatron.compat import virtual
    from tri_megatron.runtime import Runtime

    virtual.enable()
    try:
        yield Runtime("cuda", "gloo", virtual=True, reason="test")
    finally:
        virtual.disable()


@pytest.fixture(params=["cuda", "emulated"])
def kernel_device(request, monkeypatch):
    """Where the kernel-vs-reference tests run the Tri kernels: ``"cuda"`` (the compiled extension on a
    GPU; skipped only when no CUDA device is present) or ``"emulated"`` (the same csrc/kernels source
    built for the CPU emulator of tests/kernel_emulator.py, patched in as the ops' kernel module).
    Returns the torch device of the inputs."""
    import torch

    from tri_megatron.ops import ce_heads, rope_ssmax

    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        from tri_megatron.ops._kernels import kernels_available

        assert kernels_available(), "CUDA present but the Tri kernels did not load"
        return "cuda"
    from kernel_emulator import EmulatedKernels

    kern = EmulatedKernels()
    for mod in (ce_heads, rope_ssmax):  # the modules that pick the kernels
        real = mod.use_kernels_for
        monkeypatch.setattr(mod, "use_kernels_for", lambda *t, real=real: kern if all(
            x is None or x.device.type == "cpu" for x in t) else real(*t))
    return "cpu"


@pytest.fixture(autouse=True)
def _fresh_mtp_loss_tracker():
    """megatron-core logs MTP losses in a class-level tracker sized by the first model's MTP depth;
    in-process tests build models of several depths, so each starts with an empty tracker."""
    mtp = sys.modules.get("megatron.core.transformer.multi_token_prediction")
    if mtp is not None:
        mtp.MTPLossLoggingHelper.tracker.clear()
    yield
