"""Helper processes that end with the trainer that started them.

A checkpoint save starts helper processes: the background shard writer (--async-save, forked per save) and
the process megatron-core's writer sends its results through (a multiprocessing manager, started once per
trainer). When the trainer exits normally it stops them. When it is killed (SIGKILL, the OOM killer, a
launcher stopping a hung rank), nobody does: outside a SLURM step's cgroup they would linger, each holding
a Python with torch imported, and a writer could go on writing into a directory that the rerun's save uses.
On Linux the kernel's parent-death signal ends them instead; elsewhere they only check at start.
"""

from __future__ import annotations

import os
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to SIGKILL this process when the thread that started it ends. Call it first thing in
    the helper. Returns False when ``parent_pid`` is already gone (this process was reparented)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux
        pass
    return os.getppid() == parent_pid


def exit_unless_parent(parent_pid: int) -> None:
    """``die_with_parent`` for a helper that has nothing to clean up: it exits at once if the parent is gone
    (a multiprocessing manager's ``initializer``)."""
    if not die_with_parent(parent_pid):
        os._exit(0)
