"""The --save directory lock: one run writes a save directory at a time.

``DIR/tri_run.lock`` records host, pid, SLURM job id and start time; a second run on the same --save
exits 2 naming the holder before it reads or writes anything; a lock whose holder is gone (dead pid on
this host, or a heartbeat older than LOCK_STALE_MINUTES from another host) is taken over, saying why.
``lock_save_dir`` is the collective every rank calls at start.
"""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

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
