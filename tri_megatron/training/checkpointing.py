"""Distributed checkpoints (megatron-core dist_checkpointing), atomic, reshardable across layouts.

Layout of a save directory::

    DIR/latest_checkpointed_iteration.txt   # the newest complete checkpoint (written last, atomically)
    DIR/iter_0000100/                       # dist_checkpointing files + tri_meta.json + rng/
    DIR/iter_0000100.tmp-*/                 # an interrupted save; never read, removed by the next save

A checkpoint is written into a temporary directory and renamed into place only once every rank has
finished, so a crash mid-save leaves the previous checkpoint as the latest.

DIR/tri_run.lock (``SaveDirLock``) is held by the run writing DIR: a second run on the same --save exits 2
naming the holder before it writes anything; a stale lock (holder gone) is taken over, saying why.

tri_meta.json records the runtime (device, backend, virtual) the checkpoint was written on. RNG states
are restored only under the same layout *and* the same runtime: a CPU run's "CUDA" generator is the
host generator (the CPU shim), so states never cross between CPU and GPU; the load says so.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from tri_megatron import runtime, test_hooks
from tri_megatron.mcore_internals import model_sharded_state_dicts, prime_optimizer_state, torch_adam_step_passthrough

TRACKER = "latest_checkpointed_iteration.txt"
META = "tri_meta.json"


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, "metadata.json"))


def find_latest_checkpoint(root: str):
    """Path of the newest complete checkpoint under root (or root itself if it is one), else None."""
    if not root or not os.path.isdir(root):
        return None
    if _complete(root):
        return root
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        try:
            path = iter_dir(root, int(open(tracker).read().strip()))
            if _complete(path):
                return path
        except ValueError:
            pass
    done = sorted(p for p in glob.glob(os.path.join(root, "iter_*")) if not p.count(".tmp") and _complete(p))
    return done[-1] if done else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def check_compatible(path: str, arch) -> None:
    """Raise ValueError naming the first weight field (``ModelArch.WEIGHT_FIELDS``) in which the checkpoint
    differs from ``arch``."""
    mismatch = arch.weight_mismatch(read_meta(path)["model"])
    if mismatch:
        field, saved, ours = mismatch
        flag = "--" + field.replace("_", "-")
        raise ValueError(
            f"--load {path}: checkpoint has {field}={saved} but this run has {flag} {ours}; "
            f"use the checkpoint's model settings or another --load"
        )


def _unwrap(m):
    """The GPTModel inside megatron-core's DDP (and bf16 Float16Module) wrappers."""
    while hasattr(m, "module"):
        m = m.module
    return m


def _model_sharded_state_dict(model: list) -> dict:
    dicts = model_sharded_state_dicts([_unwrap(m) for m in model])  # the seam in mcore_internals
    return {"model": dicts[0]} if len(dicts) == 1 else {f"model{i}": d for i, d in enumerate(dicts)}


def _rng_state(rt) -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if rt.cuda_kernels else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def checkpoint_meta(cfg, iteration: int, consumed_samples: int, runtime: dict, has_optimizer: bool) -> dict:
    """The contents of a checkpoint's tri_meta.json (the architecture, layout and runtime that wrote it);
    ``cfg`` is the RunConfig."""
    model_meta = dict(cfg.arch.meta(), seq_length=cfg.training.seq_length)
    from tri_megatron.config.record import run_config_record

    return {"iteration": iteration, "consumed_samples": consumed_samples, "layout": cfg.parallel.meta(),
            "runtime": runtime, "model": model_meta, "has_optimizer": has_optimizer,
            "run_config": run_config_record(cfg)}  # the resolved configuration (config/record.py)


_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


# Checkpoints from before the runtime was recorded were all written on CPU.
_UNRECORDED_RUNTIME = {"device": "cpu", "backend": "gloo", "virtual": False}


def save_checkpoint(root: str, iteration: int, model: list, optimizer, scheduler, consumed_samples: int, cfg,
                    rt=None) -> str:
    """Write iteration's checkpoint of the run ``cfg`` (RunConfig) atomically under root; returns its path."""
    rt = rt or runtime.current()
    rank = dist.get_rank()
    final = iter_dir(root, iteration)
    tmp = final + ".tmp-save"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(os.path.join(root, "iter_*.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = _model_sharded_state_dict(model)
    state = dict(model_sd)
    if optimizer is not None and not cfg.checkpoint.no_save_optim:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_META)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(rt), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))
    test_hooks.pause_in_save(tmp, iteration, rank)  # TRI_TEST_PAUSE_IN_SAVE (tests/test_fault.py)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(checkpoint_meta(cfg, iteration, consumed_samples, rt.record(), "optimizer" in state),
                      f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


def rng_restorable(meta: dict, parallel, rt) -> tuple:
    """(restore?, why not): RNG states are per rank and per device kind, so only the same layout on the
    same runtime (device, backend, virtual) restores them."""
    saved_rt = meta.get("runtime", _UNRECORDED_RUNTIME)
    if saved_rt != rt.record():
        return False, (f"the checkpoint was written on {saved_rt['device']}"
                       f"{' (virtual)' if saved_rt.get('virtual') else ''}/{saved_rt['backend']} and this run is on "
                       f"{rt.signature()}")
    if meta["layout"] != parallel.meta():
        return False, None  # resharding: expected, not worth a line
    return True, None


def load_checkpoint(root: str, model: list, optimizer, scheduler, parallel, rt=None) -> tuple:
    """Load the newest complete checkpoint under root into model/optimizer/scheduler.

    Returns (iteration, consumed_samples). The RNG state is restored only under the layout (``parallel``,
    the ParallelConfig of this run) and the
    runtime it was saved with (it is per rank and per device kind); other loads keep the freshly
    seeded RNG, and a runtime change is stated on rank 0.
    """
    rt = rt or runtime.current()
    path = find_latest_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"--load {root}: no complete checkpoint")
    meta = read_meta(path)
    model_sd = _model_sharded_state_dict(model)
    state = dict(model_sd)
    load_optim = optimizer is not None and meta.get("has_optimizer", False)
    if load_optim:
        prime_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_META)
    loaded = dist_checkpointing.load(state, path)
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if load_optim:
        with torch_adam_step_passthrough(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    # A weights-only checkpoint (--no-save-optim) starts a fresh schedule from this run's flags.
    if scheduler is not None and load_optim and loaded.get("scheduler"):
        scheduler.load_state_dict(loaded["scheduler"])
    elif scheduler is not None and meta.get("continue_schedule"):  # --from-hf --keep-progress
        scheduler.step(increment=int(loaded["consumed_samples"]))  # no second warm-up
    restore, why_not = rng_restorable(meta, parallel, rt)
    if why_not and optimizer is not None and dist.get_rank() == 0:  # training resumes (not a conversion)
        print(f"tri_megatron: --load {path}: RNG states not restored ({why_not}); continuing from this run's "
              f"seeded RNG", flush=True)
    if restore:
        rng = torch.load(os.path.join(path, "rng", f"rank{dist.get_rank():05d}.pt"), weights_only=False)
        random.setstate(rng["random"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and rt.cuda_kernels:
            torch.cuda.set_rng_state(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


# ---------------------------------------------------------------------------------- --save lock
LOCK = "tri_run.lock"
LOCK_STALE_MINUTES = 10  # another host's lock whose heartbeat (mtime) is older than this is stale
LOCK_HEARTBEAT_S = 60.0


class SaveDirLocked(RuntimeError):
    """Another live run holds --save; the message names it (one line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class SaveDirLock:
    """``DIR/tri_run.lock``: JSON {host, pid, slurm_job_id, start_time, token}, created with O_EXCL, its
    mtime refreshed every LOCK_HEARTBEAT_S by a daemon thread. A lock is stale when its holder is gone:
    on this host its pid is dead; on another host its heartbeat is older than LOCK_STALE_MINUTES.
    A stale lock is taken over (and the takeover said); a live one raises SaveDirLocked naming it."""

    def __init__(self, root: str, stale_minutes: float = LOCK_STALE_MINUTES, heartbeat_s: float = LOCK_HEARTBEAT_S):
        import socket
        import time
        import uuid

        self.root, self.path = root, os.path.join(root, LOCK)
        self.stale_s, self.heartbeat_s = stale_minutes * 60, heartbeat_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                       "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
        self.took_over = None  # why a stale lock was replaced, when it was
        self._stop = None

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (a holder mid-write, or garbage): judged by its mtime alone

    def _why_stale(self, held: dict):
        import time

        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "released meanwhile"
        if held.get("host") == self.record["host"] and isinstance(held.get("pid"), int):
            if held["pid"] == os.getpid():  # not ours (another token): an earlier process that had our pid
                return f"its pid {held['pid']} on this host is this process now"
            return None if _pid_alive(held["pid"]) else f"its pid {held['pid']} on this host is gone"
        if age > self.stale_s:
            return (f"its heartbeat is {age / 60:.0f} min old (host {held.get('host', '?')}; stale after "
                    f"{self.stale_s / 60:g} min without one)")
        return None

    def _describe(self, held: dict) -> str:
        import time

        try:
            age = f"{time.time() - os.path.getmtime(self.path):.0f}s ago"
        except FileNotFoundError:
            age = "?"
        job = f", SLURM job {held['slurm_job_id']}" if held.get("slurm_job_id") else ""
        return (f"host {held.get('host', '?')} pid {held.get('pid', '?')}{job}, started {held.get('start_time', '?')}, "
                f"last heartbeat {age}")

    def acquire(self) -> "SaveDirLock":
        os.makedirs(self.root, exist_ok=True)
        payload = json.dumps(self.record).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue
                why = self._why_stale(held)
                if why is None:
                    raise SaveDirLocked(
                        f"--save {self.root}: in use by another run ({self._describe(held)}); wait for it to end or "
                        f"use another --save (if that run is gone, delete {self.path})")
                # move the stale lock aside atomically; a racer that moved it first makes ours fail: retry
                aside = f"{self.path}.stale.{self.record['token']}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                os.remove(aside)
                self.took_over = f"took over the stale lock of {self._describe_plain(held)}: {why}"
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            self._start_heartbeat()
            return self
        raise SaveDirLocked(f"--save {self.root}: could not take {self.path} (other runs are racing for it); retry")

    @staticmethod
    def _describe_plain(held: dict) -> str:
        return f"host {held.get('host', '?')} pid {held.get('pid', '?')}"

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat(stop=self._stop):
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        threading.Thread(target=beat, name="tri-save-lock-heartbeat", daemon=True).start()

    def held_by_us(self) -> bool:
        held = self._read()
        return bool(held) and held.get("token") == self.record["token"]

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self.held_by_us():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def lock_save_dir(save, rank: int):
    """Rank 0 takes the lock of the --save directory ``save``; every rank learns the outcome (the same
    path on all of them). Returns (lock or None, error message or None). Collective when
    torch.distributed is initialised."""
    if not save:
        return None, None
    lock, outcome = None, [None, None]  # [error, takeover note]
    if rank == 0:
        lock = SaveDirLock(save)
        try:
            lock.acquire()
            outcome = [None, lock.took_over]
        except (SaveDirLocked, OSError) as e:
            lock, outcome = None, [str(e) if isinstance(e, SaveDirLocked) else f"--save {save}: {e}", None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if rank == 0 and outcome[1]:
        print(f"tri_megatron: --save {save}: {outcome[1]}", flush=True)
    return lock, outcome[0]
