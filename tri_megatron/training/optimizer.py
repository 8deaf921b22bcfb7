"""Wraps model chunks in megatron-core's DDP and builds its (optionally distributed) Adam optimizer
and learning-rate / weight-decay scheduler (cosine, linear, WSD, constant)."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def wrap_ddp(chunks: list, config, parallel) -> list:
    """megatron-core DDP around each chunk for the layout ``parallel`` (ParallelConfig)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None if not parallel.overlap_grad_reduce else 40_000_000,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    for m in wrapped:
        m.broadcast_params()  # identical replicas across data-parallel ranks
    return wrapped


def build_optimizer(model: list, config, optim, parallel):
    """megatron-core's Adam (``optim``: OptimConfig; distributed when ``parallel`` says so), and the
    pipeline schedules' hooks set on the model config."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    # Hooks the pipeline schedules call: loss scaling and the end-of-step gradient reduction.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
    if parallel.overlap_param_gather and parallel.distributed_optimizer:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]
    return optimizer


def build_scheduler(optimizer, optim, global_batch_size: int, train_iters: int) -> OptimizerParamScheduler:
    """Steps are counted in samples, as Megatron does, so resuming with another batch size stays right."""
    gbs = global_batch_size
    decay_style = optim.lr_decay_style
    wsd_decay = optim.wsd_decay_iters()
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_iters else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters * gbs,
        lr_decay_steps=optim.lr_decay_iters * gbs,
        lr_decay_style=decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay * gbs if wsd_decay else None,
        lr_wsd_decay_style=optim.lr_wsd_decay_style if decay_style == "WSD" else None,
    )
