"""Memory of one pipeline stage, from megatron-core's own objects built on the meta device.

For the rank (TP 0, CP 0, DP 0) of pipeline stage ``pp_rank`` of the target job (``fake_world``):

* the stage's model chunks exactly as ``pretrain_tri.py`` builds them (every VPP chunk; embedding on
  the first, output layer and MTP on the last; bf16 under megatron's Float16Module);
* megatron's DDP around them (its contiguous parameter and fp32 gradient buffers, padding included)
  and the distributed optimizer (its fp32 main-parameter shard; torch Adam's two moments have that
  shard's shape and dtype) — bytes read from those objects' tensors;
* the activations one micro-batch leaves stored for backward, measured by running the stage's real
  chunks forward (then backward) on meta tensors with ``saved_tensors_hooks`` summing the distinct
  storages autograd keeps (weights excluded), with the GPU run's kernels where the CPU build would
  use reference code: megatron's fused SwiGLU (``bias_activation_fusion``); a core attention that saves
  what flash attention saves (q, k, v, output, fp32 log-sum-exp) instead of score matrices; RMSNorms
  that save what Transformer Engine's does (input, fp32 1/rms) instead of torch's fp32 intermediates.
  The loss is megatron's vocab-parallel cross entropy (fp32 softmax stored), not the fused MTP loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import List

import torch


@dataclasses.dataclass
class StageMemory:
    pp_rank: int
    chunks: List[str]
    params: int  # parameters this GPU holds
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # one micro-batch through every chunk of the stage
    head_bytes: int  # of which saved from the output layer on (its input, the loss)
    activation_source: str


class _FlashAttentionSaves(torch.autograd.Function):
    """Output of attention with what flash attention keeps for backward: q, k, v, out, lse (fp32).
    out is not saved here: it is the output projection's input, which that layer saves (the same
    storage on the GPU; under CP the halves are concatenated first, and only the result is kept)."""

    @staticmethod
    def forward(ctx, q, k, v):  # q [b, h, s, d]; the output is laid out [s, b, h, d] as the next reshape wants
        out = torch.empty(q.shape[2], q.shape[0], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
        out = out.permute(1, 2, 0, 3)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _RMSNormSaves(torch.autograd.Function):
    """RMSNorm output with what Transformer Engine's RMSNorm keeps: its input and fp32 1/rms per token."""

    @staticmethod
    def forward(ctx, x, weight):
        rsigma = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rsigma)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight)


def _dry_run_norm():
    """The local spec's RMSNorm, saving for backward what Transformer Engine's norm saves."""
    from tri_megatron.model.norm import TriRMSNorm

    class DryRunRMSNorm(TriRMSNorm):
        def forward(self, x):
            return _RMSNormSaves.apply(x, self.weight)

    return DryRunRMSNorm


@contextlib.contextmanager
def _dry_run_layers():
    """Flash-attention saves in the local core attention (causal, sliding-window and packed); RMSNorms
    with Transformer Engine's saves."""
    from tri_megatron.model import specs
    from tri_megatron.model.attention import SDPACoreAttention

    def attend(self, q, k, v, q_start):  # q [b, h, s, d]; k, v [b, groups, s, d], kept unexpanded as flash does
        return _FlashAttentionSaves.apply(q, k, v)

    def attend_packed(self, q, k, v, cu_seqlens, max_seqlen):  # thd (packed, and the sliding-window layers)
        out = _FlashAttentionSaves.apply(*(x.permute(1, 0, 2)[None] for x in (q, k, v)))
        return out[0].permute(1, 0, 2)  # [t, h, d], flash's varlen saves; no per-block SDPA on meta tensors

    orig = SDPACoreAttention._attend, SDPACoreAttention._attend_packed, specs.LOCAL_NORM
    SDPACoreAttention._attend, SDPACoreAttention._attend_packed = attend, attend_packed
    specs.LOCAL_NORM = _dry_run_norm()
    try:
        yield
    finally:
        SDPACoreAttention._attend, SDPACoreAttention._attend_packed, specs.LOCAL_NORM = orig


def _build_chunks(config, cfg) -> list:
    """The training builder's chunks, left where megatron creates them (the meta device here)."""
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.runtime import Runtime

    return build_model_chunks(config, cfg, False, rt=Runtime("cpu", "gloo", reason="dry run: meta device"))


def _describe(chunk) -> str:
    m = chunk.module if hasattr(chunk, "module") else chunk
    layers = [layer.layer_number - 1 for layer in m.decoder.layers]
    parts = [f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"]
    if m.pre_process:
        parts.append("embedding")
    if m.post_process:
        parts.append("final norm + output layer")
        if getattr(m, "mtp", None) is not None:
            parts.append(f"MTP x{len(m.mtp.layers)}")
    return " + ".join(parts)


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def _optimizer_bytes(optimizer) -> int:
    """fp32 main-parameter shard + Adam's exp_avg and exp_avg_sq (same shape and dtype as the main params)."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        main = [p for g in getattr(opt, "shard_fp32_from_float16_groups", []) for p in g]
        fp32 = [p for g in getattr(opt, "shard_fp32_groups", []) for p in g]  # views of the param buffer
        if not hasattr(opt, "shard_fp32_from_float16_groups"):  # no distributed optimizer
            main = [p for g in getattr(opt, "fp32_from_float16_groups", []) for p in g]
            fp32 = [p for g in getattr(opt, "fp32_from_fp32_groups", []) for p in g]
        total += sum(_tensor_bytes(p) for p in main)  # main params (fp32 copies of bf16 weights)
        total += 2 * sum(p.numel() * 4 for p in main + fp32)  # Adam moments, fp32
    return total


def _activation_bytes(chunks, cfg) -> tuple:
    """(stored-for-backward bytes of one micro-batch through the chunks, of which from the output layer
    on); the backward runs too, so a stage whose backward cannot run fails here."""
    par, tr = cfg.parallel, cfg.training
    s, b, h = tr.seq_length // par.cp, tr.micro_batch_size, cfg.arch.hidden_size
    keep_out = set()
    for c in chunks:
        keep_out |= {p.untyped_storage()._cdata for p in c.parameters()}
    saved, head = {}, {}
    where = {"head": False}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in keep_out and st._cdata not in saved:
            saved[st._cdata] = st.nbytes()
            if where["head"]:
                head[st._cdata] = st.nbytes()
        return t

    total = head_total = 0
    for c in chunks:
        inner = c.module if hasattr(c, "module") else c
        tokens = torch.zeros(b, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        if not inner.pre_process:
            s_local = s // par.tp if par.sequence_parallel else s
            inner.set_input_tensor(torch.empty(s_local, b, h, dtype=torch.bfloat16 if tr.bf16 else torch.float32,
                                               requires_grad=True))
        saved.clear()
        head.clear()
        where["head"] = False
        hook = None
        if inner.post_process:
            hook = inner.output_layer.register_forward_pre_hook(lambda *_: where.update(head=True))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = c(tokens, pos, None, labels=tokens if inner.post_process else None,
                    loss_mask=torch.ones(b, s) if inner.post_process else None)
        if hook is not None:
            hook.remove()
        total += sum(saved.values())
        head_total += sum(head.values())
        out.float().sum().backward()  # the backward must run too (shapes, recomputation)
    return total, head_total


def measure_stage(cfg, world: int, pp_rank: int) -> StageMemory:
    from megatron.core import parallel_state as ps

    from tri_megatron.dryrun.fake_world import MetaAllocations, fake_rank
    from tri_megatron.model.config import transformer_config
    from tri_megatron.ops._kernels import agree_on_kernels
    from tri_megatron.training.optimizer import build_optimizer, wrap_ddp

    par = cfg.parallel
    tp, pp, cp = par.tp, par.pp, par.cp
    rank = pp_rank * tp * cp * par.dp  # megatron's order: TP fastest, then CP, DP, PP
    with fake_rank(rank, world, tp, pp, par.vpp, cp), _dry_run_layers():
        if ps.get_pipeline_model_parallel_rank() != pp_rank or ps.get_tensor_model_parallel_rank() != 0:
            raise RuntimeError(f"rank {rank} is not pipeline stage {pp_rank} at TP rank 0")
        config = transformer_config(cfg, False)
        config.perform_initialization = False
        config.use_cpu_initialization = True
        config.bias_activation_fusion = True  # the GPU run's fused SwiGLU (saves fc1's output only)
        agree_on_kernels()  # its one collective, before the meta mode (it reads the result)
        with MetaAllocations():
            chunks = _build_chunks(config, cfg)
            params = sum(p.numel() for c in chunks for p in c.parameters())
            model = wrap_ddp(chunks, config, par)
            weight_bytes = grad_bytes = 0
            for m in model:
                for buf in list(m.buffers) + list(getattr(m, "expert_parallel_buffers", [])):
                    weight_bytes += _tensor_bytes(buf.param_data)
                    grad_bytes += _tensor_bytes(buf.grad_data)
                    if buf.param_data is None:  # parameters not in a contiguous buffer
                        weight_bytes += sum(_tensor_bytes(p) for p in buf.params)
            optimizer = build_optimizer(model, config, cfg.optim, par)
            opt_bytes = _optimizer_bytes(optimizer)
            # activations on a second, unwrapped build: DDP's hooks would start collectives on meta buffers
            act_chunks = _build_chunks(config, cfg)
            for c in act_chunks:
                c.train()
            # eager: megatron's torch.compile'd fusions store what they store either way; compiling them for
            # meta tensors only costs time (1.5 s of a 6 s tri-7b dry run) and fails in torch 2.6's inductor
            with torch.compiler.set_stance("force_eager"):
                activations, head = _activation_bytes(act_chunks, cfg)
        return StageMemory(pp_rank, [_describe(c) for c in chunks], params, weight_bytes, grad_bytes, opt_bytes,
                           activations, head, "measured: meta forward+backward of the real chunks")
