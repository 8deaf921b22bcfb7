"""CPU compatibility for megatron-core: the one place that lets it run without CUDA (tests, quickstart),
and the virtual accelerator the CPU tests run the GPU path on.

``activate()`` is a no-op on a machine with CUDA. See ``cpu.py`` for what it redirects and
``virtual.py`` for the virtual device.
"""

from tri_megatron.compat.cpu import activate, cpu_mode_active, mode
from tri_megatron.compat.virtual import DeviceMismatchError, is_device_tensor

__all__ = ["activate", "cpu_mode_active", "mode", "DeviceMismatchError", "is_device_tensor"]
