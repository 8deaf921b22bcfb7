"""Where this process sits in the job: its rank, world size, local rank and node, and the rendezvous
address, from torchrun's or SLURM's variables (the one place that reads them). Only the standard
library: configuration, data and the launchers read it before anything distributed is built."""

from __future__ import annotations

import os


def launch_env(environ=None) -> dict:
    """Where this process sits, from torchrun's or SLURM's variables: the one place that reads them.

    torchrun (also torchrun inside an srun task): RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK,
    LOCAL_WORLD_SIZE. srun with one task per GPU: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    SLURM_NODEID, SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE. torchrun's win when both are set.
    MASTER_ADDR / MASTER_PORT come from the environment (the sbatch script sets them); under SLURM
    without them, the first host of SLURM_JOB_NODELIST and a port derived from SLURM_JOB_ID.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world, local = int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        node = int(env.get("GROUP_RANK", env.get("SLURM_NODEID", 0)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        node = int(env.get("SLURM_NODEID", 0))
        local_world = _slurm_tasks_on_this_node(env)
    else:
        launcher, rank, world, local, node, local_world = "single", 0, 1, 0, 0, 1
    master_addr = env.get("MASTER_ADDR")
    master_port = env.get("MASTER_PORT")
    if launcher == "slurm" and not master_addr and env.get("SLURM_JOB_NODELIST"):
        master_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if launcher == "slurm" and not master_port and env.get("SLURM_JOB_ID"):
        master_port = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return {
        "launcher": launcher,
        "rank": rank,
        "world_size": world,
        "local_rank": local,
        "local_world_size": local_world,
        "node_rank": node,
        "master_addr": master_addr or "127.0.0.1",
        "master_port": master_port or "29500",
    }


def _slurm_tasks_on_this_node(env) -> int:
    """SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE ('8(x64)' or '2,1')."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec, node = env.get("SLURM_TASKS_PER_NODE", ""), int(env.get("SLURM_NODEID", 0))
    counts = []
    for part in filter(None, spec.split(",")):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node] if node < len(counts) else 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames | head -1` prints it:
    'gpu[012-015,020],cpu1' -> 'gpu012', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
    head, depth = "", 0
    for ch in nodelist:  # the first top-level entry
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            break
        head += ch
    host = ""
    while "[" in head and "]" in head:
        prefix, rest = head.split("[", 1)
        ranges, head = rest.split("]", 1)
        host += prefix + ranges.split(",")[0].split("-")[0]
    return host + head
