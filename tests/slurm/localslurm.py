#!/usr/bin/env python3
"""A throw-away one-node SLURM cluster on localhost, for tests (Debian's slurm-wlm 22.05 + munge).

Everything lives under one directory: a private munge key and socket, slurm.conf, state and spool
directories, daemon logs. The daemons run in the foreground as children of this process (or of the
``start`` command, which records their pids), on free ports, so nothing clashes with a system
SLURM or munge and ``stop`` ends exactly the processes it started.

    python tests/slurm/localslurm.py start DIR     # prints: export SLURM_CONF=DIR/slurm.conf
    SLURM_CONF=DIR/slurm.conf sbatch ...           # use it
    python tests/slurm/localslurm.py stop DIR

Needs root (slurmd launches jobs as the submitting user; munged and slurmd check file ownership)
and the packages ``slurm-wlm munge`` (``apt-get install -y slurm-wlm munge``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from tri_megatron.local_dist import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES_HINT = "apt-get update && apt-get install -y slurm-wlm munge"


class SlurmUnavailable(RuntimeError):
    """The SLURM or munge binaries are missing, or we are not root."""


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root (slurmd and munged run as root here)"
    absent = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
              if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if absent:
        return f"missing {', '.join(absent)}: {PACKAGES_HINT}"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: str, cpus: int = 2, partition: str = "debug"):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]  # what `hostname -s` prints: slurmd's node name
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}

    # -------------------------------------------------------------- set-up
    def env(self, base: dict | None = None) -> dict:
        """Environment for SLURM client commands (sbatch, scontrol, ...) against this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and v != "SLURM_CONF"]:
            env.pop(var)  # we may ourselves run inside a SLURM job: do not leak its settings
        return env

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(key, 0o400)
        conf = f"""# written by tests/slurm/localslurm.py: a one-node test cluster on {self.host}
ClusterName=tritest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port("")}
SlurmdPort={free_port("")}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _spawn(self, name: str, cmd: list) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()
        with open(os.path.join(self.root, "pids.json"), "w") as f:
            json.dump({n: p.pid for n, p in self.procs.items()}, f)

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def start(self, timeout: float = 60) -> "LocalSlurm":
        why = missing_requirements()
        if why:
            raise SlurmUnavailable(why)
        self._write_files()
        m = os.path.join(self.root, "munge")
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait("munged's socket", lambda: os.path.exists(self.munge_socket), timeout)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf])
        self._wait("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).stdout.find("UP") >= 0, timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
        self._wait("the node to be idle", lambda: "idle" in self.run(
            ["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout, timeout)
        return self

    # -------------------------------------------------------------- use
    def run(self, cmd: list, check: bool = True, timeout: float = 30, env: dict | None = None):
        proc = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str, *args, env: dict | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args, script], env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        info = {}
        for tok in proc.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout", "slurmd.stdout"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                text = open(path, errors="replace").read()
                if text.strip():
                    out.append(f"--- {name}\n{text[-tail:]}")
        return "\n".join(out)

    # -------------------------------------------------------------- tear-down
    def stop(self, timeout: float = 20) -> None:
        """Cancel what is left of the jobs, then end the daemons we started (slurmd first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--signal=KILL", "--user", "root"], check=False)
            self.run(["scancel", "--user", "root"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _stop_from_pidfile(root: str) -> None:
    path = os.path.join(os.path.abspath(root), "pids.json")
    if not os.path.exists(path):
        return
    pids = json.load(open(path))
    for name in ("slurmd", "slurmctld", "munged"):
        pid = pids.get(name)
        if not pid:
            continue
        try:  # only the process we started, and only if it is still that daemon
            if name[:6] not in open(f"/proc/{pid}/cmdline").read():
                continue
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError):
            continue
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)
    os.remove(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, root = argv
    if cmd == "stop":
        _stop_from_pidfile(root)
        return 0
    cluster = LocalSlurm(root)
    cluster.start()
    # the daemons keep running after we exit (own sessions); `stop DIR` ends them by their pids
    cluster.procs.clear()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
