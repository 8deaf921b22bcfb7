"""The installed megatron-core release and the error a seam raises when it no longer matches."""

from __future__ import annotations


def _version() -> str:
    import megatron.core

    return megatron.core.__version__


def _release() -> tuple:
    return tuple(int(p) for p in _version().split("+")[0].split(".")[:2])


class SeamError(RuntimeError):
    """The installed megatron-core does not match what a seam here relies on."""

    def __init__(self, seam: str, detail: str):
        super().__init__(f"megatron-core {_version()}: the seam '{seam}' in tri_megatron/mcore_internals/ no "
                         f"longer matches ({detail}); verified with megatron-core 0.16.1 and 0.19.0")
