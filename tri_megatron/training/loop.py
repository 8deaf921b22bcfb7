"""The training loop on megatron-core's pipeline schedules.

``setup`` builds model chunks (DDP-wrapped) on the runtime's device, optimizer and scheduler and
loads a checkpoint; every micro-batch is moved to that device (and, under context parallelism, cut to
this rank's share of the sequence) before the model sees it; ``train_step`` runs one global batch through ``get_forward_backward_func()`` (1F1B, interleaved
when VPP > 1, or no pipelining) and the optimizer; ``train`` loops, logs, evaluates and saves.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from tri_megatron.mcore_internals import batch_on_this_cp_rank, clear_mtp_tracker, take_mtp_losses
from tri_megatron import runtime, test_hooks
from tri_megatron.model.builder import build_model_chunks
from tri_megatron.model.config import transformer_config
from tri_megatron.runtime import use_transformer_engine
from tri_megatron.training import checkpointing, fault
from tri_megatron.training.console import memory_stats
from tri_megatron.perf.devices import detect_peak_tflops
from tri_megatron.perf.flops import hardware_flops_per_iteration, model_flops_per_iteration
from tri_megatron.training.optimizer import build_optimizer, build_scheduler, wrap_ddp


class Trainer:
    def __init__(self, cfg, rt=None):
        """``cfg``: the RunConfig (tri_megatron.config); ``rt``: the runtime (default: the active one)."""
        self.cfg = cfg
        tr, ckpt = cfg.training, cfg.checkpoint
        self.rt = rt or runtime.current()
        self.use_te = use_transformer_engine(tr.transformer_impl)
        self.config = transformer_config(cfg, self.use_te, self.rt)
        self.model = wrap_ddp(build_model_chunks(self.config, cfg, self.use_te, self.rt), self.config, cfg.parallel)
        self.optimizer = build_optimizer(self.model, self.config, cfg.optim, cfg.parallel)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tr.global_batch_size, tr.train_iters)
        self.iteration = 0
        self.consumed_samples = 0
        self.last_saved_iteration = None  # no need to save again what --save already holds
        self.checkpoints = checkpointing.CheckpointWriter(ckpt, self.rt) if ckpt.save else None
        if ckpt.load:
            self.iteration, self.consumed_samples = checkpointing.load_checkpoint(
                ckpt.load, self.model, self.optimizer, self.scheduler, cfg.parallel, self.rt, options=ckpt)
            if ckpt.save and os.path.realpath(ckpt.load) == os.path.realpath(ckpt.save):
                self.last_saved_iteration = self.iteration
        self.exit_conditions = fault.ExitConditions(cfg.fault)
        self.nonfinite_policy = fault.NonfinitePolicy(cfg.fault)
        self.exit_reason = None  # (reason, detail) when the run stopped before --train-iters
        self._poison = False  # test hook --inject-nan-at-iter
        self._logger = None  # the MetricsLogger of train(): checkpoint commits are reported to it
        self._save_started = {}  # iteration -> time its save began
        self.num_microbatches = cfg.num_microbatches
        self.peak_tflops = cfg.logging.peak_tflops or detect_peak_tflops()
        self.world_size = dist.get_world_size()

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _loss_func(loss_mask, output_tensor):
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.reshape(-1).float()
        loss_sum = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}

    def _packed(self) -> bool:
        """--reset-attention-mask: every micro-batch is one THD sequence of micro_batch_size * seq_length
        tokens, whatever its number of documents (so every stage and rank has the same shapes)."""
        return self.cfg.data.reset_attention_mask

    def _p2p_shape(self) -> tuple:
        """(seq_length, micro_batch_size) of the activations the pipeline stages exchange."""
        if self._packed():
            return self.cfg.training.seq_length * self.cfg.training.micro_batch_size, 1
        return self.cfg.training.seq_length, self.cfg.training.micro_batch_size

    def _device_batch(self, batch: dict) -> dict:
        """The micro-batch on the runtime's device; under CP, this rank's two sequence chunks
        (megatron's load-balanced split: chunks r and 2*CP-1-r of 2*CP). A packed micro-batch (it
        carries cu_seqlens, tri_megatron.data.packing) becomes one [1, b*s] THD sequence with
        megatron-core's PackedSeqParams under "packed_seq_params"."""
        cu, max_seqlen = batch.pop("cu_seqlens", None), batch.pop("max_seqlen", None)
        if cu is not None:
            from tri_megatron.data.packing import packed_seq_params, to_thd

            batch = to_thd(batch)
        batch = {k: v.to(self.rt.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if cu is not None:
            batch["packed_seq_params"] = packed_seq_params(cu.to(self.rt.device, non_blocking=True), max_seqlen)
        if self.cfg.parallel.cp > 1:
            batch = batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())
        return batch

    def _forward_step(self, data_iterator, model):
        batch = self._device_batch(next(data_iterator))
        packed = {"packed_seq_params": batch["packed_seq_params"]} if "packed_seq_params" in batch else {}
        output = model(batch["tokens"], batch["position_ids"], None,
                       labels=batch["labels"], loss_mask=batch["loss_mask"], **packed)
        if self._poison:
            output = test_hooks.poison(output)
        return output, partial(self._loss_func, batch["loss_mask"])

    def _iterators(self, make):
        """One iterator per model chunk, all over the same micro-batch sequence."""
        return [make() for _ in self.model] if len(self.model) > 1 else make()

    def _run_schedule(self, data_iterator, forward_only: bool) -> list:
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            seq_length=self._p2p_shape()[0],
            micro_batch_size=self._p2p_shape()[1],
            forward_only=forward_only,
        )

    def _reduce_losses(self, losses_reduced: list, nonfinite_grads: float = 0.0) -> tuple:
        """(lm_loss, mtp_loss, nonfinite_grads) over the global batch, known on every rank.

        nonfinite_grads (this rank's count of gradient tensors holding NaN/inf) rides along in the
        same all-reduce and comes back summed over all ranks."""
        depth = self.cfg.arch.mtp_num_layers
        vec = torch.zeros(4 + depth, dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for item in losses_reduced:
                vec[:2] += item["lm loss"].double().cpu()
            mtp = take_mtp_losses() if depth else None
            if mtp is not None:
                vec[2:2 + depth] = mtp.double().cpu() / self.num_microbatches
                vec[2 + depth] = 1.0
        vec[3 + depth] = nonfinite_grads
        if depth:
            clear_mtp_tracker()  # forward-only passes on other stages record nothing; keep it empty
        vec = vec.to(self.rt.device)
        dist.all_reduce(vec)
        vec = vec.cpu()
        lm = (vec[0] / vec[1]).item() if vec[1] > 0 else float("nan")
        mtp = (vec[2:2 + depth].mean() / vec[2 + depth]).item() if depth and vec[2 + depth] > 0 else None
        return lm, mtp, vec[3 + depth].item()

    def train_step(self, data_iterator) -> dict:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._poison = test_hooks.poison_iteration(self.iteration + 1, self.cfg.inject_nan_at_iter)
        losses = self._run_schedule(data_iterator, forward_only=False)
        self._poison = False
        # NaN/inf in the loss or any gradient is found before the optimizer step, agreed by all ranks
        # (the loss all-reduce carries the count), and the update is then not applied at all.
        lm_loss, mtp_loss, bad_grads = self._reduce_losses(losses, fault.count_nonfinite_grads(self.model))
        nonfinite = fault.nonfinite_fields(lm_loss, mtp_loss, bad_grads)
        if nonfinite:
            ok, grad_norm = False, None
        else:
            ok, grad_norm, _ = self.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                nonfinite = ["grad_norm"]  # finite gradients whose norm overflowed fp32: reported, already applied
        if ok:
            self.scheduler.step(increment=self.cfg.training.global_batch_size)
        return {"lm_loss": lm_loss, "mtp_loss": mtp_loss,
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok,
                "nonfinite": nonfinite}

    @torch.no_grad()
    def evaluate(self, data) -> dict:
        for m in self.model:
            m.eval()
        results = {}
        for domain in data.valid_domains:
            total, count = 0.0, 0
            it = self._iterators(lambda: data.valid_iterator(domain))
            for _ in range(self.cfg.training.eval_iters):
                losses = self._run_schedule(it, forward_only=True)
                lm, _, _ = self._reduce_losses(losses)
                if not math.isnan(lm):
                    total, count = total + lm, count + 1
            results[domain] = total / max(count, 1)
        for m in self.model:
            m.train()
        return results

    # ------------------------------------------------------------------ loop
    def train(self, data, logger, on_save=None) -> list:
        """Train to --train-iters (or an exit condition); the run ends once its checkpoints are committed.
        A checkpoint that cannot be written stops the run: exit_reason ("save_failed", one line)."""
        history = []
        try:
            self._train_loop(data, logger, on_save, history)
            if self.checkpoints is not None:
                self.checkpoints.wait()  # --async-save: the last checkpoint is complete before the run ends
        except checkpointing.CheckpointSaveError as e:
            self.exit_reason = ("save_failed", str(e))
        return history

    def _train_loop(self, data, logger, on_save, history: list) -> list:
        cfg, tr, ckpt = self.cfg, self.cfg.training, self.cfg.checkpoint
        mflops = model_flops_per_iteration(cfg.arch, tr.seq_length, tr.tokens_per_iteration)
        hflops = hardware_flops_per_iteration(cfg.arch, tr.seq_length, tr.tokens_per_iteration, **tr.recompute(),
                                              pp=cfg.parallel.pp, vpp=cfg.parallel.vpp)
        # each model chunk walks the same micro-batch sequence from the same position
        it = self._iterators(lambda: data.train_iterator(self.consumed_samples))
        for m in self.model:
            m.train()
        self._logger = logger  # save() reports its commits to it
        logger.begin(self.iteration, cuda=self.rt.cuda_kernels)
        if self.rt.cuda_kernels:
            torch.cuda.reset_peak_memory_stats()  # peak memory is per log interval (console.memory_stats)
        while self.iteration < tr.train_iters:
            if self.rt.cuda_kernels:
                torch.cuda.synchronize()
            lr = self.optimizer.param_groups[0]["lr"]
            t0 = time.time()
            out = self.train_step(it)
            if self.rt.cuda_kernels:
                torch.cuda.synchronize()
            dt = time.time() - t0
            self.iteration += 1
            self.consumed_samples += tr.global_batch_size
            record = self._record(out, lr, dt, mflops, hflops, data)
            history.append(record)
            logger.iteration(record, console=self.iteration % cfg.logging.log_interval == 0)
            test_hooks.iteration_sleep()
            if self._stops_on_nonfinite(out):
                return history
            if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                logger.eval(self.iteration, self.evaluate(data))
            if self.checkpoints is not None:
                self.checkpoints.poll()  # --async-save: commit the background save once every rank wrote it
            stop = self.exit_conditions.check(self.iteration)
            if ckpt.save and ((ckpt.save_interval and self.iteration % ckpt.save_interval == 0) or stop):
                self.save(on_save)
            if stop:
                self.exit_reason = stop
                self._say(f"stopping after iteration {self.iteration}: {stop[1]}"
                          + (f"; checkpoint saved to {ckpt.save}" if ckpt.save else "; no --save, nothing saved"))
                return history
        if ckpt.save and self.iteration != self.last_saved_iteration:
            self.save(on_save)
        return history

    def _record(self, out: dict, lr: float, dt: float, mflops: float, hflops: float, data) -> dict:
        """The iteration's record (console, --log-json, TensorBoard, W&B): losses, throughput and MFU/HFU
        (Megatron's convention), consumed samples and tokens, the data mixture's weights, memory."""
        cfg, tr = self.cfg, self.cfg.training
        tflops = mflops / dt / self.world_size / 1e12
        hfu_tflops = hflops / dt / self.world_size / 1e12
        record = {
            "iteration": self.iteration,
            "lm_loss": out["lm_loss"],
            "mtp_loss": out["mtp_loss"],
            "grad_norm": out["grad_norm"],
            "lr": lr,
            "tokens_per_sec": tr.tokens_per_iteration / dt,
            "tflops_per_device": tflops,
            "hfu_tflops_per_device": hfu_tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "hfu": hfu_tflops / self.peak_tflops if self.peak_tflops else None,
            "step_time_s": dt,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_samples * tr.seq_length,
            "skipped": out["skipped"],
        }
        if hasattr(data, "weights_at"):  # the data mixture's scheduled weights at consumed_samples
            record["mixture"] = data.weights_at(self.consumed_samples)
        if out["nonfinite"]:
            record["nonfinite"] = out["nonfinite"]
        if self.iteration % cfg.logging.log_interval == 0:  # every rank: the interval's memory, max over ranks
            record.update(memory_stats(self.rt, cfg.logging.log_memory))
        return record

    def _stops_on_nonfinite(self, out: dict) -> bool:
        """Apply --on-nonfinite / --max-nonfinite-skips to this step; True when the run must stop (unsaved)."""
        if not out["nonfinite"]:
            self.nonfinite_policy.observe([])
            return False
        action = self.nonfinite_policy.observe(out["nonfinite"])
        self._say(f"iteration {self.iteration}: non-finite {', '.join(out['nonfinite'])} "
                  f"(lm_loss={out['lm_loss']}, grad_norm={out['grad_norm']}); "
                  + ("update skipped" if out["skipped"] else "update applied (the gradients were finite)")
                  + ("; stopping (--on-nonfinite stop / --max-nonfinite-skips), no checkpoint written"
                     if action == "stop" else ""))
        if action == "stop":
            self.exit_reason = ("nonfinite", f"non-finite {', '.join(out['nonfinite'])} at iteration {self.iteration}")
        return action == "stop"

    def _say(self, text: str) -> None:
        if dist.get_rank() == 0:
            print(f"tri_megatron: {text}", flush=True)

    def save(self, on_save=None) -> str:
        """Save this iteration's checkpoint (in the background with --async-save); once committed,
        ``on_save(iteration, path)`` runs (e.g. an HF export) and --keep-last-n rotates."""
        self._save_started[self.iteration] = time.time()  # the commit's console line says how long it took
        path = self.checkpoints.save(self.iteration, self.model, self.optimizer, self.scheduler,
                                     self.consumed_samples, self.cfg, on_commit=partial(self._committed, on_save))
        self.last_saved_iteration = self.iteration
        return path

    def _committed(self, on_save, iteration: int, path: str) -> None:
        if self._logger is not None:
            self._logger.checkpoint_saved(iteration, path, time.time() - self._save_started.pop(iteration, time.time()),
                                          background=self.cfg.checkpoint.async_save)
        if on_save:
            on_save(iteration, path)
        keep = self.cfg.checkpoint.keep_last_n
        if keep and dist.get_rank() == 0:
            checkpointing.rotate_checkpoints(self.cfg.checkpoint.save, keep, iteration, on_save)
