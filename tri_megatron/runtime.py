"""The one device decision of a run: ``--device auto|cuda|cpu`` resolved once into a ``Runtime``.

Everything that depends on where training runs reads the runtime instead of asking
``torch.cuda.is_available()`` itself: the device batches and the model are moved to, the process-group
backend and the settings that follow it (``batch_p2p_comm``), whether CUDA-only fusions/kernels are
used, and what a checkpoint records about the RNG states it holds.

* ``resolve(requested)``: decide (pure: environment and CUDA probe in, ``Runtime`` or ``DeviceError``
  out). ``auto`` picks CUDA when usable. Without it, ``auto`` falls back to the CPU only where no GPU was
  expected: under SLURM with several tasks or GPUs allocated, a multi-process launch with
  ``CUDA_VISIBLE_DEVICES`` set, or on a node with NVIDIA device files it is an error naming the likely
  cause (CPU-only torch, driver too old for the wheel's CUDA, no GPU bound to the task).
  ``TRI_VIRTUAL_DEVICE=1`` (the CPU tests) makes ``auto``/``cuda`` resolve, where no CUDA is usable,
  to the *virtual* device: "cuda" emulated on the host by ``tri_megatron.compat.virtual``, so the
  GPU code path runs and any tensor left on the host raises as it would on a GPU.
* ``activate(rt)``: make it the process's runtime (CPU shim / virtual device, or ``set_device``).
* ``agree(store, rt, rank, world)``: every rank checks, through the rendezvous store and before the
  process group exists, that all ranks decided the same; otherwise all exit with the disagreement.
* ``current()``: the active runtime (in-process tools that never called ``activate``: derived once from
  what is set up).
* ``transformer_engine_available()`` / ``use_transformer_engine(impl)``: whether this machine has a usable
  Transformer Engine, and ``--transformer-impl`` resolved against it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import torch

VIRTUAL_ENV = "TRI_VIRTUAL_DEVICE"
DEVICE_CHOICES = ("auto", "cuda", "cpu")


class DeviceError(ValueError):
    """The requested device cannot be used; one line naming the flag, the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class Runtime:
    device_type: str  # "cuda" or "cpu"
    backend: str  # process-group backend: "nccl" or "gloo"
    virtual: bool = False  # "cuda" emulated on the host (CPU tests of the GPU path)
    local_rank: int = 0
    reason: str = ""  # why this device (for the start-up line)

    @property
    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        if self.virtual:
            return torch.device("cuda", 0)
        return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))

    @property
    def on_accelerator(self) -> bool:
        """The GPU code path (model and batches on the device), real or virtual."""
        return self.device_type == "cuda"

    @property
    def cuda_kernels(self) -> bool:
        """Real CUDA: CUDA-only fusions and the Tri kernels can run."""
        return self.device_type == "cuda" and not self.virtual

    @property
    def batch_p2p_comm(self) -> bool:
        """Batched pipeline p2p: NCCL only. gloo matches messages by order per peer, so a batched
        exchange with the same rank as both pipeline neighbours (PP=2) would pair them wrongly."""
        return self.backend == "nccl"

    def record(self) -> dict:
        """What checkpoints store about where their RNG states come from."""
        return {"device": self.device_type, "backend": self.backend, "virtual": self.virtual}

    def signature(self) -> str:
        return f"{self.device_type}{' (virtual)' if self.virtual else ''}/{self.backend}"

    def describe(self) -> str:
        what = {"cuda": "virtual CUDA device (host memory, host tensors rejected)" if self.virtual else "CUDA",
                "cpu": "CPU"}[self.device_type]
        return f"{what}, {self.backend}" + (f" ({self.reason})" if self.reason else "")


def _truthy(v: Optional[str]) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def gpu_expected(environ, nvidia_devices: Optional[bool] = None) -> Optional[str]:
    """Why this process should have a GPU (a phrase), or None where a CPU run is plausible."""
    env = environ
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if env.get("SLURM_JOB_ID") and ntasks and ntasks.isdigit() and int(ntasks) > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} with {ntasks} tasks"
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_GPUS"):
        if env.get(var):
            return f"SLURM job with GPUs allocated ({var}={env[var]})"
    local_world = env.get("LOCAL_WORLD_SIZE", "1")
    if "CUDA_VISIBLE_DEVICES" in env and local_world.isdigit() and int(local_world) > 1:
        return f"multi-process launch ({local_world} per node) with CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
    if os.path.exists("/dev/nvidiactl") if nvidia_devices is None else nvidia_devices:
        return "node with NVIDIA devices (/dev/nvidiactl)"
    return None


def cuda_unusable_cause(environ, init: Optional[Callable[[], None]] = None) -> str:
    """The likely reason CUDA is unusable here, as a phrase with its fix."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA wheel of torch"
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "NoDevFiles"):
        return (f"CUDA_VISIBLE_DEVICES={cvd!r}: the launcher bound no GPU to this task "
                f"(check srun --gpus-per-task / --gpu-bind, or the torchrun environment)")
    try:
        (init or torch.cuda.init)()
    except Exception as e:  # noqa: BLE001 - the CUDA runtime's own words are the cause
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"the CUDA runtime says: {msg} (this torch is built for CUDA {torch.version.cuda}; "
                f"an NVIDIA driver older than that CUDA version is the usual cause)")
    return "no GPU is visible to this process (check the job's GPU binding)"


def resolve(requested: str = "auto", environ=None, cuda_available: Optional[bool] = None,
            local_rank: int = 0, cuda_init: Optional[Callable[[], None]] = None,
            nvidia_devices: Optional[bool] = None) -> Runtime:
    """Decide the device; raises DeviceError (one line) when the request cannot be honoured."""
    env = os.environ if environ is None else environ
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"--device {requested}: choose one of {', '.join(DEVICE_CHOICES)}")
    usable = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cpu":
        if usable:  # megatron-core allocates on CUDA by itself wherever CUDA is usable
            raise DeviceError("--device cpu: this process sees a usable CUDA device, which megatron-core would "
                              "use anyway; hide it with CUDA_VISIBLE_DEVICES= to train on the CPU, or use --device auto")
        return Runtime("cpu", "gloo", local_rank=local_rank, reason="--device cpu")
    if usable:
        return Runtime("cuda", "nccl", local_rank=local_rank, reason=f"--device {requested}")
    if _truthy(env.get(VIRTUAL_ENV)):
        return Runtime("cuda", "gloo", virtual=True, local_rank=local_rank, reason=f"{VIRTUAL_ENV}=1")
    if requested == "cuda":
        raise DeviceError(f"--device cuda: no usable CUDA device: {cuda_unusable_cause(env, cuda_init)}")
    expected = gpu_expected(env, nvidia_devices)
    if expected:
        raise DeviceError(
            f"--device auto: no usable CUDA device in this {expected}, and a GPU job never falls back to the "
            f"CPU: {cuda_unusable_cause(env, cuda_init)}; or pass --device cpu to train on CPUs deliberately")
    return Runtime("cpu", "gloo", local_rank=local_rank, reason="--device auto: no CUDA device")


_CURRENT: Optional[Runtime] = None


def activate(rt: Runtime) -> Runtime:
    """Make rt this process's runtime: the CPU shim or the virtual device, or the CUDA device."""
    global _CURRENT
    from tri_megatron import compat

    if rt.cuda_kernels:
        torch.cuda.set_device(rt.device)
    else:  # resolve() never returns a CPU or virtual runtime where CUDA is usable
        compat.activate(virtual_device=rt.virtual)
    _CURRENT = rt
    return rt


def current() -> Runtime:
    """The active runtime; where none was activated (in-process tools), what is set up: CUDA if usable,
    else the CPU shim's mode."""
    if _CURRENT is not None:
        return _CURRENT
    from tri_megatron import compat

    if torch.cuda.is_available():
        return Runtime("cuda", "nccl")
    if compat.mode() == "virtual":
        return Runtime("cuda", "gloo", virtual=True)
    return Runtime("cpu", "gloo")


def agree(store, rt: Runtime, rank: int, world_size: int, timeout_s: float = 600.0) -> None:
    """All ranks check they decided the same device/backend; DeviceError naming the odd ranks otherwise.

    Through the rendezvous store, before any process group: ranks that disagree would otherwise build
    groups on different backends and hang."""
    if world_size <= 1:
        return
    import datetime

    from torch.distributed import PrefixStore

    s = PrefixStore("tri_runtime", store)
    s.set(f"rank{rank}", f"{rt.signature()}|{rt.reason}")
    if rank == 0:
        s.wait([f"rank{r}" for r in range(world_size)], datetime.timedelta(seconds=timeout_s))
        seen = [s.get(f"rank{r}").decode() for r in range(world_size)]
        mine = seen[0].split("|")[0]
        odd = [(r, v) for r, v in enumerate(seen) if v.split("|")[0] != mine]
        verdict = "ok" if not odd else (
            f"ranks decided different devices: rank 0 {seen[0].replace('|', ' (')}) but "
            + ", ".join(f"rank {r} {v.replace('|', ' (')})" for r, v in odd[:4])
            + (f" and {len(odd) - 4} more" if len(odd) > 4 else "")
            + "; give every rank the same GPU binding or pass the same --device")
        s.set("verdict", verdict)
    verdict = s.get("verdict").decode()
    if verdict != "ok":
        raise DeviceError(verdict)


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match torch
        return False
    return True


def use_transformer_engine(impl: str) -> bool:
    """Resolve --transformer-impl (auto, transformer_engine, local)."""
    if impl == "local":
        return False
    if impl == "transformer_engine":
        return True
    return transformer_engine_available()
