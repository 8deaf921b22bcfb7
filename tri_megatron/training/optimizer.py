"""Wraps model chunks in megatron-core's DDP and builds its (optionally distributed) Adam optimizer
and learning-rate / weight-decay scheduler (cosine, linear, WSD, constant)."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def wrap_ddp(chunks: list, config, args) -> list:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None if not args.overlap_grad_reduce else 40_000_000,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    for m in wrapped:
        m.broadcast_params()  # identical replicas across data-parallel ranks
    return wrapped


def build_optimizer(model: list, config, args):
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    # Hooks the pipeline schedules call: loss scaling and the end-of-step gradient reduction.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
    if args.overlap_param_gather and args.use_distributed_optimizer:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]
    return optimizer


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Steps are counted in samples, as Megatron does, so resuming with another batch size stays right."""
    gbs = args.global_batch_size
    decay_style = args.lr_decay_style
    wsd_decay = None
    if decay_style == "WSD":
        wsd_decay = (args.lr_wsd_decay_iters or max(1, args.lr_decay_iters // 10)) * gbs
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style="linear" if decay_style == "WSD" else None,
    )
