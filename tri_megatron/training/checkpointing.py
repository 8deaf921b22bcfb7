"""Distributed checkpoints (megatron-core dist_checkpointing): atomic, verified, reshardable across
layouts and across the plain and distributed optimizers, written synchronously or in the background.

Layout of a save directory (``checkpoint_files``)::

    DIR/latest_checkpointed_iteration.txt   # the newest committed checkpoint (written last, atomically)
    DIR/iter_0000100/                       # dist_checkpointing files + rng/ + tri_meta.json (with file sizes)
    DIR/iter_0000100.tmp-*/                 # a save in progress or interrupted; never read, removed by the next save

``CheckpointWriter`` writes a checkpoint into a temporary directory with megatron-core's torch_dist
strategy -- at once, or with --async-save through megatron-core's ``AsyncCallsQueue`` (a forked writer per
rank while training continues) -- and commits it only when every rank has written its part: rank 0
records every file's size in tri_meta.json, renames the directory into place, then updates the tracker.
So a crash or a failed write (a full disk) leaves the previous checkpoint as the latest, and a failed
save stops the run with one line (``CheckpointSaveError``; the temporary directory is removed). A later
save waits for the pending one; so does the end of the run. --keep-last-n rotation runs after a commit.

``load_checkpoint`` loads the newest intact checkpoint (a damaged one -- files differing from the sizes
recorded at commit -- is passed over for the one before, saying so). The optimizer state is
megatron-core's model-space format (the distributed optimizer's ``fully_reshardable``), so it reshards
across TP/PP/DP and loads into the other kind of optimizer (``optimizer_resume``). --no-load-optim,
--no-load-rng and --finetune have Megatron's meaning.

DIR/tri_run.lock (``training/save_lock.py``) is held by the run writing DIR: a second run on the same --save
exits 2 naming the holder before it writes anything; a stale lock (holder gone) is taken over, saying why.

tri_meta.json records the runtime (device, backend, virtual) the checkpoint was written on. RNG states
are restored only under the same layout *and* the same runtime: a CPU run's "CUDA" generator is the
host generator (the CPU shim), so states never cross between CPU and GPU; the load says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from tri_megatron import runtime, test_hooks
from tri_megatron.checkpoint_files import (META, TRACKER, file_sizes, find_latest_checkpoint,  # noqa: F401
                                           is_complete, iter_dir, remove_debris, rotate, tracked_iteration)
from tri_megatron.mcore_internals import (async_sharded_save, model_sharded_state_dicts, prime_optimizer_state,
                                          torch_adam_step_passthrough)
from tri_megatron.parent_death import die_with_parent
from tri_megatron.training import optimizer_resume
from tri_megatron.training.fault import signal_received

EXIT_SAVE_FAILED = 4  # process exit code when a checkpoint could not be written (e.g. the disk is full)


def _complete(path: str) -> bool:
    return is_complete(path)


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


# megatron-core's model-space format for the distributed optimizer: one tensor per parameter and state,
# the plain optimizer's keys for exp_avg/exp_avg_sq (reshardable across TP/PP/DP and optimizer kinds)
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


# Checkpoints from before the runtime was recorded were all written on CPU.
_UNRECORDED_RUNTIME = {"device": "cpu", "backend": "gloo", "virtual": False}


# ---------------------------------------------------------------------------------- saving
class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message is one line (what, why, which checkpoint stays latest)."""


def _agree(error: Optional[str]) -> Optional[str]:
    """This rank's error (None: fine) against every rank's: the first one, naming its rank, or None.
    Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e if e.startswith("rank ") else f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError behind an exception (megatron wraps a writer's in RuntimeErrors), else the innermost one."""
    seen = exc
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        seen, exc = exc, exc.__cause__ or exc.__context__
    return seen


def _describe(exc: BaseException) -> Optional[str]:
    """What went wrong, in a few words; None where this rank only knows another rank failed."""
    if isinstance(exc, CheckpointException):
        for rank, (err, _) in sorted(exc.failures.items()):
            return f"rank {rank}: {_root_cause(err)}".replace("Worker failure: ", "")  # megatron's wrapping
        return None
    return str(_root_cause(exc))


def _dies_with(trainer_pid: int, write):
    """The background shard writer (forked by megatron's async caller) ends with the training process
    (``parent_death``): a writer outliving a crashed trainer could write into the same temporary directory
    as the save of the rerun."""
    def write_in_child(*args, **kwargs):
        if not die_with_parent(trainer_pid):  # the trainer is gone already
            return None
        return write(*args, **kwargs)

    return write_in_child


class CheckpointWriter:
    """Writes (and commits, and rotates) the checkpoints of a run into ``ckpt.save`` (``ckpt``: the run's
    CheckpointConfig). ``save`` returns once this rank's data is staged; with --async-save the shards are
    written in the background and the commit happens in ``poll``/``wait`` (every rank calls them, each
    iteration), otherwise before ``save`` returns. Failures raise CheckpointSaveError on every rank."""

    def __init__(self, ckpt, rt=None):
        self.root, self.rt = ckpt.save, rt or runtime.current()
        self._queue = None
        if ckpt.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)  # a forked writer per save (per rank)
        self.pending = None  # (iteration, temporary directory) of the save being written in the background

    def save(self, iteration: int, model: list, optimizer, scheduler, consumed_samples: int, cfg,
             on_commit: Optional[Callable[[int, str], None]] = None) -> str:
        """Write iteration's checkpoint of the run ``cfg`` (RunConfig); returns the path it has once committed.
        ``on_commit(iteration, path)`` runs on every rank once it is committed."""
        self.wait()  # one save at a time: the previous one is committed (or has failed) first
        rank = dist.get_rank()
        final = iter_dir(self.root, iteration)
        tmp = final + ".tmp-save"
        error = None
        if rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                remove_debris(self.root)
                os.makedirs(tmp)
            except OSError as e:
                error = str(e)
        self._check(_agree(error), iteration, tmp)
        model_sd = _model_sharded_state_dict(model)
        state = dict(model_sd)
        if optimizer is not None and not cfg.checkpoint.no_save_optim:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_META)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["iteration"] = iteration
        state["consumed_samples"] = consumed_samples
        meta = checkpoint_meta(cfg, iteration, consumed_samples, self.rt.record(), "optimizer" in state)
        try:
            # the torch_dist strategy's request: common.pt now (rank 0), the shards by request.async_fn
            request = async_sharded_save(state, tmp)  # megatron's own writer on 0.16-0.19 (mcore_internals)
        except OSError as e:  # rank 0's common.pt: the other ranks learn it from the process group's end
            self._fail(iteration, tmp, e, agreed=False)
        error = None
        try:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            torch.save(_rng_state(self.rt), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))
        except OSError as e:
            error = str(e)
        self._check(_agree(error), iteration, tmp)
        if request.async_fn is not None:
            write = test_hooks.wrap_shard_writer(request.async_fn, tmp, iteration)
            request = request._replace(async_fn=_dies_with(os.getpid(), write) if self._queue is not None else write)
        request.add_finalize_fn(partial(self._commit, iteration, tmp, final, meta, on_commit))
        if self._queue is not None:
            self._queue.schedule_async_request(request)
            self.pending = (iteration, tmp)
            return final
        try:
            request.execute_sync()
        except (CheckpointException, OSError, CheckpointSaveError) as e:
            self._fail(iteration, tmp, e)
        return final

    def _commit(self, iteration: int, tmp: str, final: str, meta: dict, on_commit) -> None:
        """Every rank has written its part (megatron's finalization ran): rank 0 records the file sizes,
        renames the checkpoint into place, then points the tracker at it."""
        rank = dist.get_rank()
        test_hooks.pause_in_save(tmp, iteration, rank, signal_received)  # TRI_TEST_PAUSE_IN_SAVE (tests/test_fault.py)
        dist.barrier()
        error = None
        if rank == 0:
            try:
                meta["files"] = file_sizes(tmp)
                with open(os.path.join(tmp, META), "w") as f:
                    json.dump(meta, f, indent=1)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                tracker_tmp = os.path.join(self.root, TRACKER + ".tmp")
                with open(tracker_tmp, "w") as f:
                    f.write(str(iteration))
                os.replace(tracker_tmp, os.path.join(self.root, TRACKER))
            except OSError as e:
                error = str(e)
        error = _agree(error)
        if error:
            raise CheckpointSaveError(error)
        if on_commit is not None:
            on_commit(iteration, final)

    def poll(self) -> None:
        """Commit the background save if every rank has finished writing it. Collective."""
        if self.pending is not None:
            self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait for the background save and commit it. Collective."""
        if self.pending is not None:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        iteration, tmp = self.pending
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (CheckpointException, OSError, CheckpointSaveError) as e:
            self.pending = None
            self._fail(iteration, tmp, e)
        if done or blocking:
            self.pending = None

    def _check(self, error: Optional[str], iteration: int, tmp: str) -> None:
        if error:
            self._fail(iteration, tmp, CheckpointSaveError(error))

    def _fail(self, iteration: int, tmp: str, exc: BaseException, agreed: bool = True) -> None:
        """Remove what was written of the failed save and raise the one-line CheckpointSaveError."""
        if isinstance(exc, CheckpointSaveError):  # agreed by every rank already
            cause = str(exc)
        else:
            cause = _describe(exc)
            cause = (_agree(cause) or cause) if agreed else cause
        if not agreed or dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if agreed and dist.get_world_size() > 1:
            dist.barrier()
        latest = tracked_iteration(self.root)
        raise CheckpointSaveError(
            f"saving the checkpoint of iteration {iteration} to {self.root} failed: {cause or 'unknown error'}; "
            + (f"the checkpoint of iteration {latest} stays the latest" if latest is not None
               else "no earlier checkpoint there") + " (free space or fix the file system, then rerun to resume)")


def rotate_checkpoints(root: str, keep: int, newest: int, on_save=None) -> list:
    """--keep-last-n after the commit of ``newest`` (rank 0): the checkpoints an HF export started by
    ``on_save`` (convert/export_hook.HFExporter) is still reading are kept."""
    busy = {it for it, proc, _ in getattr(on_save, "running", ()) if proc.poll() is None}
    return rotate(root, keep, newest, busy)


# ---------------------------------------------------------------------------------- loading
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


def _find_checkpoint(root: str) -> Optional[str]:
    """The checkpoint to load under root, decided by rank 0 (which says why when it passes over a damaged
    one) and shared with every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = [None]
    if rank == 0:
        path[0] = find_latest_checkpoint(root, say=lambda m: print(f"tri_megatron: --load {root}: {m}", flush=True))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def load_checkpoint(root: str, model: list, optimizer, scheduler, parallel, rt=None, options=None) -> tuple:
    # Long because the load is one ordered protocol (find an intact checkpoint, build the sharded request,
    # load, optimizer switch, schedule, RNG) whose steps depend on what earlier ones found.
    """Load the newest intact checkpoint under root into model/optimizer/scheduler.

    Returns (iteration, consumed_samples). ``options`` (the run's CheckpointConfig) may ask, as Megatron,
    for no optimizer/schedule (--no-load-optim), no RNG (--no-load-rng), or the weights only with the
    iteration and consumed samples at 0 (--finetune). The optimizer state loads into either kind of
    optimizer at any layout. The RNG state is restored only under the layout (``parallel``, the
    ParallelConfig of this run) and the runtime it was saved with (it is per rank and per device kind);
    other loads keep the freshly seeded RNG, and a runtime change is stated on rank 0.
    """
    rt = rt or runtime.current()
    finetune = bool(getattr(options, "finetune", False))
    no_optim = finetune or bool(getattr(options, "no_load_optim", False))
    no_rng = finetune or bool(getattr(options, "no_load_rng", False))
    path = _find_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"--load {root}: no complete checkpoint")
    meta = read_meta(path)
    model_sd = _model_sharded_state_dict(model)
    state = dict(model_sd)
    load_optim = optimizer is not None and meta.get("has_optimizer", False) and not no_optim
    switched = False
    if load_optim:
        saved_keys = set(dist_checkpointing.load_tensors_metadata(path))
        prime_optimizer_state(optimizer)
        request = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_META)
        switched = optimizer_resume.is_distributed(optimizer) != optimizer_resume.saved_distributed(saved_keys)
        own = optimizer_resume.split(request) if switched else None
        taken = optimizer_resume.alias_main_weights(request, saved_keys)
        # written by the other kind of optimizer: its tensors, in this optimizer's own structure
        optim_key = optimizer_resume.SWITCH_KEY if switched else "optimizer"
        state[optim_key] = request
    loaded = dist_checkpointing.load(state, path)
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if load_optim:
        optimizer_resume.load_taken(taken, path, loaded[optim_key])
        optim_state = (optimizer_resume.assemble(own, loaded[optim_key], loaded.get("optimizer"))
                       if switched else loaded["optimizer"])
        with torch_adam_step_passthrough(optimizer):
            optimizer.load_state_dict(optim_state)
        # A weights-only checkpoint (--no-save-optim) starts a fresh schedule from this run's flags.
        if scheduler is not None and loaded.get("scheduler"):
            scheduler.load_state_dict(loaded["scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # the fp32 main weights follow the loaded model weights
        if scheduler is not None and meta.get("continue_schedule") and not no_optim:  # --from-hf --keep-progress
            scheduler.step(increment=int(loaded["consumed_samples"]))  # no second warm-up
    restore, why_not = rng_restorable(meta, parallel, rt)
    if no_rng:
        restore, why_not = False, None
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
    if finetune:
        return 0, 0
    return int(loaded["iteration"]), int(loaded["consumed_samples"])
