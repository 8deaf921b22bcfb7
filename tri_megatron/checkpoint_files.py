"""The files of a --save directory: which checkpoint is the latest intact one, and rotation.

    DIR/latest_checkpointed_iteration.txt   # the newest committed checkpoint (written last, atomically)
    DIR/iter_0000100/                       # a committed checkpoint: dist_checkpointing files, rng/, tri_meta.json
    DIR/iter_0000100.tmp-*/                 # a save in progress or interrupted (never read; removed by the next save)

A checkpoint is complete when it holds tri_meta.json (written last, by the commit) and megatron-core's
metadata.json. tri_meta.json lists every file of the checkpoint with its size at commit time
(``"files"``); a checkpoint whose files no longer match (a truncated shard, a lost file) is damaged, and
``find_latest_checkpoint`` falls back to the newest intact one, saying why through ``say``.

Only the standard library: the run configuration resolves --load with it before anything is built.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import threading
from typing import Callable, Iterable, Optional

TRACKER = "latest_checkpointed_iteration.txt"
META = "tri_meta.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, "metadata.json"))


def file_sizes(path: str) -> dict:
    """{relative path: size} of every file under ``path`` except tri_meta.json (the manifest of a commit)."""
    sizes = {}
    for top, _, files in os.walk(path):
        for name in files:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, path)
            if rel != META:
                sizes[rel] = os.path.getsize(full)
    return sizes


def damage(path: str) -> Optional[str]:
    """Why the complete checkpoint at ``path`` is damaged (its files differ from the sizes recorded at
    commit), or None. Checkpoints written before the sizes were recorded cannot be checked: None."""
    try:
        with open(os.path.join(path, META)) as f:
            recorded = json.load(f).get("files")
    except (OSError, ValueError) as e:
        return f"{META} unreadable ({e})"
    for rel, size in (recorded or {}).items():
        try:
            actual = os.path.getsize(os.path.join(path, rel))
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} recorded at save"
    return None


def committed(root: str) -> list:
    """(iteration, path) of the complete checkpoints directly under ``root``, newest first."""
    out = []
    for p in glob.glob(os.path.join(root, "iter_*")):
        m = _ITER_RE.match(os.path.basename(p))
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def tracked_iteration(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def find_latest_checkpoint(root: str, say: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Path of the checkpoint a --load of ``root`` reads, else None: root itself if it is a checkpoint,
    else the tracker's, else the newest complete one; a damaged one is passed over for the newest intact
    one before it, and ``say`` (if given) is told so in one line."""
    if not root or not os.path.isdir(root):
        return None
    if is_complete(root):
        candidates = [root]
    else:
        done = committed(root)
        tracked = tracked_iteration(root)
        if tracked is not None and is_complete(iter_dir(root, tracked)):
            # the tracker names the newest commit; anything numbered after it is from an abandoned timeline
            done = [(it, p) for it, p in done if it <= tracked]
        candidates = [p for _, p in done]
    skipped = []
    for path in candidates:
        why = damage(path)
        if why is None:
            if skipped and say is not None:
                say(f"{'; '.join(skipped)}: loading {path} instead, the newest intact checkpoint")
            return path
        skipped.append(f"{path} is damaged ({why})")
    if skipped and say is not None:
        say(f"{'; '.join(skipped)}: no intact checkpoint left")
    return None


def rotate(root: str, keep: int, newest: int, in_use: Iterable[int] = ()) -> list:
    """--keep-last-n: delete the complete checkpoints of ``root`` older than the ``keep`` newest ones up to
    iteration ``newest`` (just committed; never deleted), except those whose iteration is in ``in_use``
    (an export still reading them). Each is first renamed aside (so no half-deleted checkpoint ever looks
    complete), then removed by a background thread (training does not wait for the file system; what an
    exit interrupts is removed by the next save). Returns the paths deleted."""
    if keep <= 0:
        return []
    in_use = set(in_use)
    older = [(it, p) for it, p in committed(root) if it < newest]
    removed = []
    for it, path in older[max(keep - 1, 0):]:
        if it in in_use:
            continue
        aside = path + ".tmp-delete"
        try:
            os.replace(path, aside)
        except OSError:
            continue
        threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True},
                         name="tri-checkpoint-rotation", daemon=True).start()
        removed.append(path)
    return removed


def remove_debris(root: str) -> None:
    """Remove interrupted saves and deletions (``iter_*.tmp-*``) under ``root``."""
    for stale in glob.glob(os.path.join(root, "iter_*.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
