"""Per-GPU proxy of a large layout: the shard one GPU holds, run on one device.

For a target layout (e.g. tri-21b on 512 GPUs at TP=4, PP=4, DP=32) a GPU of pipeline rank r holds
the decoder layers of its model chunk(s) (``num_layers / PP`` layers; with VPP its chunks r, r+PP,
...), each with 1/TP of the attention heads, query groups and FFN width, plus the embedding (first
rank) or the final norm, the output layer over 1/TP of the vocabulary and the MTP modules (last
rank). The proxy builds exactly that as a one-process megatron-core ``GPTModel`` (TP=PP=1, the
sliced sizes as the model's sizes, the stage's iRoPE / sliding-window layer pattern), runs the
layout's micro-batch size and sequence length through forward + backward for the layout's number of
micro-batches (gradient accumulation, as one pipeline rank does), then the optimizer over the
shard's parameters, and counts the shard's FLOPs with ``flops.stage_flops_per_token``.

Modelled: every GEMM at its real per-GPU shape, core attention (flash kernels, windows) at the
real per-GPU head count and sequence length, the loss over the vocabulary shard, recomputation,
MTP, precision, memory of weights / gradients / one micro-batch of activations, and the optimizer
step over this GPU's share of the distributed optimizer (``EmulatedAdam``; megatron-core's optimizer
over the whole shard with ``optimizer="megatron"``).

Not modelled (no other GPU exists): TP all-reduce / all-gather / reduce-scatter, CP ring exchange
(CP > 1 is refused: attention over the whole sequence is not reproducible in one process), PP
send / receive and the pipeline bubble, DP gradient reduce-scatter / parameter all-gather,
vocab-parallel loss reductions. With sequence parallelism the proxy runs norms on the whole sequence (1/TP of that
with SP) and stores their inputs whole; middle / last stages get a random input activation instead
of a received one; the first stage's output feeds a cheap surrogate loss. Activations of the
micro-batches 1F1B keeps in flight are not held (see ``layout_model.memory_per_gpu`` for that).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import torch

from tri_megatron.perf.flops import stage_flops_per_token, stage_layer_numbers

STAGES = ("first", "middle", "last")


@dataclasses.dataclass
class ProxySpec:
    target_gpus: int
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    stage: str
    rank: int
    layers: list
    pre_process: bool
    post_process: bool
    num_microbatches: int  # the layout's, per iteration
    run_microbatches: int  # what the proxy runs per iteration
    micro_batch_size: int
    seq_length: int
    shard: dict  # per-GPU sizes

    def describe(self) -> str:
        parts = f"TP={self.tp} PP={self.pp}" + (f" VPP={self.vpp}" if self.vpp > 1 else "") + f" DP={self.dp}"
        return (f"{self.target_gpus} GPUs at {parts}: {self.stage} stage (pipeline rank {self.rank}), "
                f"{len(self.layers)} layers, heads {self.shard['num_attention_heads']}/"
                f"groups {self.shard['num_query_groups']}/FFN {self.shard['ffn_hidden_size']}/"
                f"vocab {self.shard['vocab_size']} per GPU")


def make_spec(cfg, stage: str = "last", run_microbatches: Optional[int] = None) -> ProxySpec:
    """The shard one GPU holds in the layout of ``cfg`` (a RunConfig validated for the target GPU count)."""
    par, tr, arch = cfg.parallel, cfg.training, cfg.arch
    tp, pp, cp, vpp = par.tp, par.pp, par.cp, par.model_chunks
    if cp > 1:
        raise ValueError("the per-GPU proxy does not model context parallelism (attention spans the CP group); "
                         "use --context-parallel-size 1")
    if stage not in STAGES:
        raise ValueError(f"--proxy-stage {stage!r}: choose one of {', '.join(STAGES)}")
    if pp == 1:
        rank = 0
        stage = "only"
    elif stage == "first":
        rank = 0
    elif stage == "last":
        rank = pp - 1
    else:
        if pp < 3:
            raise ValueError(f"--proxy-stage middle needs --pipeline-model-parallel-size >= 3 (got {pp})")
        rank = pp // 2
    m = cfg.num_microbatches
    shard = {
        "num_layers": arch.num_layers // pp,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads // tp,
        "num_query_groups": arch.num_query_groups // tp,
        "kv_channels": arch.kv_channels,
        "ffn_hidden_size": arch.ffn_hidden_size // tp,
        "vocab_size": arch.padded_vocab_size() // tp,
        "mtp_num_layers": arch.mtp_num_layers if rank == pp - 1 else 0,
    }
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"--ffn-hidden-size {arch.ffn_hidden_size} does not split over TP={tp}")
    return ProxySpec(target_gpus=par.world_size, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=par.dp, stage=stage, rank=rank,
                     layers=stage_layer_numbers(arch.num_layers, pp, vpp, rank), pre_process=rank == 0,
                     post_process=rank == pp - 1, num_microbatches=m, run_microbatches=run_microbatches or m,
                     micro_batch_size=tr.micro_batch_size, seq_length=tr.seq_length, shard=shard)


def proxy_config(cfg, spec: ProxySpec):
    """The run configuration of the one-process model that is the shard: the shard's sizes as the
    architecture, the stage's global iRoPE / sliding-window layer pattern, no parallelism, no checkpoints."""
    from tri_megatron.config.parallel import ParallelConfig

    arch, tr = cfg.arch, cfg.training
    shard = dict(spec.shard, untie_embeddings_and_output_weights=True)  # a tied pair lives on two ranks; same compute
    mtp_numbers = list(range(arch.num_layers + 1, arch.num_layers + spec.shard["mtp_num_layers"] + 1))
    if arch.no_rope_freq:  # megatron's per-layer form: 1 = skip RoPE
        shard["no_rope_freq"] = [1 if n % arch.no_rope_freq == 0 else 0 for n in spec.layers]
    if arch.window_size and arch.window_attn_skip_freq:
        shard["window_attn_skip_freq"] = [1 if arch.is_window_layer(n, tr.seq_length) else 0
                                          for n in [*spec.layers, *mtp_numbers]]
    training = dict(global_batch_size=spec.micro_batch_size * spec.run_microbatches)
    if tr.recompute_granularity == "full" and tr.recompute_method == "block" and spec.vpp > 1:
        per_chunk = arch.num_layers // (spec.pp * spec.vpp)
        training["recompute_num_layers"] = min(tr.recompute_num_layers, per_chunk) * spec.vpp  # merged chunks
    return cfg.replace(arch=arch.replace(**shard), parallel=ParallelConfig(),
                       training=dataclasses.replace(tr, **training),
                       checkpoint=dataclasses.replace(cfg.checkpoint, load=None, save=None))


def shard_flops_per_token(cfg, spec: ProxySpec, attention: str = "causal") -> dict:
    """Model / hardware FLOPs per token that this GPU does in the target layout of ``cfg``."""
    tr = cfg.training
    rc = {"granularity": tr.recompute_granularity, "method": tr.recompute_method,
          "recompute_num_layers": tr.recompute_num_layers}
    return stage_flops_per_token(cfg.arch, tr.seq_length, spec.pp, spec.vpp, spec.rank, tp=spec.tp, recompute=rc,
                                 attention=attention)


class EmulatedAdam:
    """Stands for this GPU's share of the distributed optimizer without holding Adam state for the whole shard.

    One H100 cannot hold bf16 weights + fp32 gradients + fp32 master weights and Adam moments (18 bytes
    per parameter) for, e.g., a 5.2B-parameter tri-21b TP=4 shard; with the distributed optimizer a GPU
    of the real layout holds master weights and moments for 1/(DP x CP) of them. This steps AdamW over flat
    fp32 tensors of that many elements (gradient-norm, clipping, update, bf16 copy back to the weights),
    the same HBM traffic as megatron-core's step on that GPU, minus the parameter all-gather.
    """

    def __init__(self, numel: int, device, bf16: bool):
        numel = max(int(numel), 1)
        gen = torch.Generator(device=device).manual_seed(0)
        self.param = torch.zeros(numel, device=device, dtype=torch.float32, requires_grad=True)
        self.param.grad = torch.randn(numel, generator=gen, device=device, dtype=torch.float32) * 1e-3
        self.model_copy = torch.empty(numel, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
        self.inner = torch.optim.AdamW([self.param], lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
        self.numel = numel

    @torch.no_grad()
    def step(self):
        norm = torch.linalg.vector_norm(self.param.grad)
        self.param.grad.mul_(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        self.inner.step()
        self.model_copy.copy_(self.param)
        return True, norm, None

    def zero_grad(self):
        pass  # the model's gradient buffers are zeroed by zero_grad_buffer; this gradient stays


class ProxyRunner:
    """Builds the shard (megatron-core parallel state must be initialised at TP=PP=1) and steps it.

    ``optimizer``: "emulated" (default; ``EmulatedAdam`` over shard parameters / ``optimizer_shards``, i.e.
    DP x CP with the distributed optimizer, 1 without) or "megatron" (megatron-core's optimizer over the whole
    shard: 18 bytes per parameter, small shards only).
    """

    def __init__(self, pcfg, spec: ProxySpec, optimizer: str = "emulated", optimizer_shards: int = 1):
        """``pcfg``: the shard's run configuration (``proxy_config``)."""
        from megatron.core.enums import ModelType
        from megatron.core.transformer.module import Float16Module

        from tri_megatron.model.builder import build_gpt_model
        from tri_megatron.model.config import transformer_config
        from tri_megatron.runtime import use_transformer_engine
        from tri_megatron.training.mock_data import micro_batch
        from tri_megatron.training.optimizer import build_optimizer, wrap_ddp

        self.cfg, self.spec = pcfg, spec
        tr = pcfg.training
        self.use_te = use_transformer_engine(tr.transformer_impl)
        self.config = transformer_config(pcfg, self.use_te)
        model = build_gpt_model(self.config, pcfg, self.use_te, spec.pre_process, spec.post_process)
        model.model_type = ModelType.encoder_or_decoder
        self.built_vocab = getattr(model, "vocab_size", None)
        from tri_megatron import runtime

        device = runtime.current().device
        model.to(device)  # as build_model_chunks: torch-norm weights and Tri parameters are created on the host
        if tr.bf16:
            model = Float16Module(self.config, model)
        self.model = wrap_ddp([model], self.config, pcfg.parallel)
        self.params = sum(p.numel() for p in self.model[0].parameters())
        self.optimizer_kind = optimizer
        if optimizer == "megatron":
            self.optimizer = build_optimizer(self.model, self.config, pcfg.optim, pcfg.parallel)
        elif optimizer == "emulated":
            self.optimizer = EmulatedAdam(-(-self.params // optimizer_shards), device, tr.bf16)
            self.config.grad_scale_func = None  # bf16 / fp32: no loss scaling
            self.config.finalize_model_grads_func = None  # one process: no gradient to synchronise
        else:
            raise ValueError(f"proxy optimizer {optimizer!r}: emulated or megatron")
        self.optimizer_numel = getattr(self.optimizer, "numel", self.params)
        batch = micro_batch(range(spec.micro_batch_size), spec.seq_length, pcfg.arch.vocab_size, tr.seed)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        dtype = torch.bfloat16 if tr.bf16 else torch.float32
        shape = (spec.seq_length, spec.micro_batch_size, pcfg.arch.hidden_size)
        gen = torch.Generator(device=device).manual_seed(tr.seed)
        self.hidden_in = None
        if not spec.pre_process:  # stands for the activation received from the previous stage
            self.hidden_in = torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)
        self.probe = None
        if not spec.post_process:  # surrogate loss: <output, random direction>, a dense output gradient
            self.probe = torch.randn(shape, generator=gen, device=device, dtype=dtype)

    @staticmethod
    def _loss_func(loss_mask, output_tensor):
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.reshape(-1).float()
        loss_sum = torch.sum(losses * mask)
        return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}

    @staticmethod
    def _surrogate_loss(probe, output_tensor):
        loss = (output_tensor * probe).float().sum()
        n = torch.tensor(output_tensor.shape[0] * output_tensor.shape[1], dtype=torch.int, device=loss.device)
        return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}

    def _forward_step(self, data_iterator, model):
        from megatron.core.utils import get_attr_wrapped_model

        b = self.batch
        if self.hidden_in is not None:
            get_attr_wrapped_model(model, "set_input_tensor")(self.hidden_in)
        if self.spec.post_process:
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
            return out, partial(self._loss_func, b["loss_mask"])
        out = model(b["tokens"], b["position_ids"], None)
        return out, partial(self._surrogate_loss, self.probe)

    def train_step(self) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.hidden_in is not None:
            self.hidden_in.grad = None
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=None,
            model=self.model[0],
            num_microbatches=self.spec.run_microbatches,
            seq_length=self.spec.seq_length,
            micro_batch_size=self.spec.micro_batch_size,
            forward_only=False,
        )
        self.optimizer.step()
        from tri_megatron.mcore_internals import clear_mtp_tracker

        clear_mtp_tracker()  # MTP losses are logged by nobody here
