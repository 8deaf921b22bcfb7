"""Typed configuration: the architecture record (``ModelArch``, arch.py) and the run configuration
(``RunConfig``, run.py, one part per concern: parallel.py, training.py, optim.py, checkpoint.py,
fault.py, logs.py, export.py; the data part is ``tri_megatron.data.config``), built once from the
command line by ``load_run_config``; the presets (presets.py) are ModelArch values; megatron_flags.py and
config_file.py take Megatron-LM's flags and ``--config FILE.yaml``.

The package imports only ``arch`` and ``errors`` eagerly, so ``presets`` (which ``run`` depends on) can
import the architecture record without a cycle.
"""

from tri_megatron.config.arch import ModelArch
from tri_megatron.config.errors import ArgumentError

_RUN_NAMES = ("RunConfig", "build_parser", "config_from_namespace", "load_run_config")


def __getattr__(name):
    if name in _RUN_NAMES:
        from tri_megatron.config import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["ModelArch", "ArgumentError", *_RUN_NAMES]
