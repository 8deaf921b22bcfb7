"""CPU compatibility for megatron-core: the one place that lets it run without CUDA (tests, quickstart).

``activate()`` is a no-op on a machine with CUDA. See ``cpu.py`` for what it redirects.
"""

from tri_megatron.compat.cpu import activate, cpu_mode_active

__all__ = ["activate", "cpu_mode_active"]
