#!/usr/bin/env python
"""Pretrain a Tri model on megatron-core.

    torchrun --nproc_per_node N pretrain_tri.py --model tri-tiny --mock-data ...

flags -> the typed run configuration and the device decision (exit 2, nothing written; tri_megatron.config)
-> distributed init on the runtime's backend (NCCL on GPU, gloo on CPU) -> model, data, optimizer ->
training loop -> checkpoints and logs.
"""

from __future__ import annotations

import sys
import time
import warnings

# megatron-core warns at import about optional fused kernels (TE/apex) it can do without.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
from tri_megatron.config import ArgumentError, load_run_config  # noqa: E402
from tri_megatron.launcher import launch_env  # noqa: E402


def resolve_runtime(device: str):
    """The run's one device decision (tri_megatron.runtime); ArgumentError when it cannot be honoured."""
    from tri_megatron.runtime import DeviceError, resolve

    try:
        return resolve(device, local_rank=launch_env()["local_rank"])
    except DeviceError as e:
        raise ArgumentError(f"{e} (rank {launch_env()['rank']})") from None


# How long a rank other than 0 waits, after a bad command line, for rank 0 to say so (see below).
ERROR_GRACE_S = 30.0


def check_before_start(argv=None):
    """The run configuration and the runtime, with everything checkable before any process group or
    model exists checked; exit 2 with one line on error."""
    from tri_megatron import test_hooks

    test_hooks.start_delay(launch_env()["rank"])
    try:
        cfg = load_run_config(argv)  # --tokenizer is read here (the model's vocabulary follows it)
        rt = resolve_runtime(cfg.training.device)
        from tri_megatron.launch_checks import check_load_fits

        hint = " (found in --save: auto-resume; use a new --save directory to start afresh)"
        check_load_fits(cfg, hint if cfg.checkpoint.auto_resume else "")
    except ArgumentError as e:
        # Every rank parses the same command line: rank 0 says it once (a device error is per rank). The
        # others must not exit first: torchrun, and srun --kill-on-bad-exit, stop every rank once one has
        # failed, and would stop rank 0 before it prints (a loaded node starts its ranks seconds apart).
        # So they wait to be stopped, and say it themselves only if rank 0 has not failed (e.g. a file
        # that rank 0's node has and theirs lacks).
        rank = launch_env()["rank"]
        if rank != 0 and "(rank " not in str(e):
            time.sleep(ERROR_GRACE_S)
            e = ArgumentError(f"{e} (rank {rank})")
        print(f"pretrain_tri.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return cfg, rt


def build_run_data(cfg, dp_rank: int, dp_size: int):
    """This data-parallel rank's training and validation data for the run ``cfg``."""
    tr = cfg.training
    if cfg.data.mock_data:
        from tri_megatron.training.mock_data import MockData

        return MockData(tr.seq_length, cfg.arch.vocab_size, tr.micro_batch_size, dp_rank, dp_size, tr.seed,
                        config=cfg.data)
    from tri_megatron.data.provider import build_data as build_file_data

    return build_file_data(
        cfg.data_args(), dp_rank=dp_rank, dp_size=dp_size,
        train_samples=tr.train_iters * tr.global_batch_size,
        eval_samples=max(tr.eval_iters, 1) * tr.global_batch_size,
    )


def main(argv=None) -> list:
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):  # validate + size the launch, one CPU process
        from tri_megatron.dryrun import main as dry_run

        sys.exit(dry_run(argv))
    cfg, rt = check_before_start(argv)
    from tri_megatron.training.console import finished_run_message

    complete = finished_run_message(cfg)  # a rerun of a finished run: say so, train nothing, exit 0
    if complete:
        if launch_env()["rank"] == 0:
            print(f"tri_megatron: {complete}", flush=True)
        return []
    from tri_megatron.training import fault

    # early, so a preemption notice that arrives while the model is built or loaded is not lost; and
    # before megatron-core is imported (under torch 2.6 that starts inductor's compile worker)
    fault.install_exit_signal_handler(cfg.fault, rank=launch_env()["rank"])
    from megatron.core import parallel_state

    from tri_megatron.convert.export_hook import make_on_save
    from tri_megatron.convert.hf_io import record_tokenizer
    from tri_megatron.training.distributed import destroy_distributed, init_distributed
    from tri_megatron.training.loop import Trainer
    from tri_megatron.training.metrics import MetricsLogger
    from tri_megatron.runtime import DeviceError

    try:
        env = init_distributed(cfg.parallel, cfg.training.seed, rt)
    except DeviceError as e:  # the ranks decided differently: all of them stop here
        print(f"pretrain_tri.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    from tri_megatron.training.save_lock import lock_save_dir

    ckpt = cfg.checkpoint
    lock, locked = lock_save_dir(ckpt.save, env["rank"])  # before anything is read from or written to --save
    if locked:
        if env["rank"] == 0:
            print(f"pretrain_tri.py: error: {locked}", file=sys.stderr)
        destroy_distributed()
        sys.exit(2)
    if env["rank"] == 0:  # the resolved configuration, as stored in every checkpoint's tri_meta.json
        from tri_megatron.config.record import describe

        print(describe(cfg), flush=True)
    try:
        try:
            record_tokenizer(cfg.data.tokenizer, ckpt.save, env["rank"])  # so that --to-hf ships it
            data = build_run_data(cfg, parallel_state.get_data_parallel_rank(),
                              parallel_state.get_data_parallel_world_size())
            trainer = Trainer(cfg, rt)
            logger = MetricsLogger(cfg.logging, cfg.training.train_iters, env["rank"], run=cfg)
            if ckpt.load:  # records of iterations after this one written before this line are superseded
                import time

                logger.event({"event": "restart", "iteration": trainer.iteration, "load": ckpt.load,
                              "auto_resume": ckpt.auto_resume, "time": time.time()})
            from tri_megatron.training.console import startup_banner

            for line in startup_banner(cfg, rt, trainer):  # collective: parameters counted on every rank
                logger.say(line)
            history = trainer.train(data, logger, on_save=make_on_save(cfg, env["rank"]))
            logger.close()
        finally:
            destroy_distributed()
        reason = trainer.exit_reason[0] if trainer.exit_reason else None
        if reason == "nonfinite":
            sys.exit(fault.EXIT_NONFINITE)
        if reason == "save_failed":  # e.g. a full disk: the previous checkpoint stays the latest
            from tri_megatron.training.checkpointing import EXIT_SAVE_FAILED

            if env["rank"] == 0:
                print(f"pretrain_tri.py: error: {trainer.exit_reason[1]}", file=sys.stderr, flush=True)
            sys.exit(EXIT_SAVE_FAILED)
        if (cfg.fault.slurm_requeue and env["rank"] == 0 and reason in ("signal", "duration")
                and trainer.iteration < cfg.training.train_iters):
            if lock is not None:
                lock.release()  # the requeued job takes it
            fault.requeue_slurm_job()  # last: SLURM ends this job's processes as it requeues it
    finally:
        if lock is not None:
            lock.release()
    return history


if __name__ == "__main__":
    main()
