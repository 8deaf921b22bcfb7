"""The Tri model pieces against plain PyTorch: presets, query scaling, core attention, parameter counts."""

import math

import pytest
import torch

from tri_megatron.config.presets import PRESETS
from tri_megatron.model.query_scaling import QueryScaling
from tri_megatron.ops import apply_rope_and_query_scale


@pytest.mark.parametrize("name", ["tri-7b", "tri-21b", "tri-70b"])
def test_preset_sizes_match_published(name):
    p = PRESETS[name]
    assert p.arch.num_parameters() == pytest.approx(p.published_params, rel=0.005)


def test_published_dimensions():
    p = PRESETS["tri-21b"].arch
    assert (p.num_layers, p.hidden_size, p.ffn_hidden_size, p.num_attention_heads, p.num_query_groups,
            p.kv_channels, p.vocab_size, p.context_length) == (40, 5120, 27392, 32, 8, 160, 124416, 8192)
    p = PRESETS["tri-70b"].arch
    assert (p.num_layers, p.hidden_size, p.ffn_hidden_size, p.num_attention_heads, p.num_query_groups,
            p.kv_channels, p.vocab_size, p.context_length, p.no_rope_freq, p.window_size) == \
        (80, 8192, 28672, 64, 8, 128, 124416, 32768, 4, 4096)


def test_ssmax_scales_each_query_by_s_log_n():
    qs = QueryScaling("ssmax", 3, ssmax_init=0.5)
    with torch.no_grad():
        qs.ssmax_scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    q = torch.randn(5, 2, 3, 4)
    out = qs(q)
    for i in range(5):
        for h in range(3):
            expected = q[i, :, h] * qs.ssmax_scale[h] * math.log(i + 1)
            torch.testing.assert_close(out[i, :, h], expected)
    out.sum().backward()
    assert qs.ssmax_scale.grad is not None and qs.ssmax_scale.grad.abs().sum() > 0


def test_temperature_tuning_matches_llama4_formula():
    qs = QueryScaling("temperature", 2, floor_scale=4.0, attn_scale=0.1)
    q = torch.ones(12, 1, 2, 2)
    out = qs(q)
    for pos in range(12):
        factor = math.log(math.floor((pos + 1) / 4.0) + 1) * 0.1 + 1
        assert out[pos, 0, 0, 0].item() == pytest.approx(factor)


def test_ssmax_positions_restart_in_each_packed_document():
    qs = QueryScaling("ssmax", 1, ssmax_init=1.0)
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    out = qs(torch.ones(9, 1, 1), cu)  # thd layout
    positions = [0, 1, 2, 0, 1, 2, 3, 0, 1]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([math.log(p + 1) for p in positions]))


def test_exact_parameter_count_of_built_model(megatron_single_process):
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config

    args = load_run_config(["--mock-data", "--mtp-num-layers", "1", "--ssmax", "--vocab-size", "1024"], world_size=1, rank=0)
    model = build_model_chunks(transformer_config(args, False), args, False)[0]
    built = sum(p.numel() for p in model.parameters())
    assert built == args.arch.num_parameters()


def test_sdpa_core_attention_matches_naive_windowed_gqa(megatron_single_process):
    from tri_megatron.config import load_run_config
    from tri_megatron.model.attention import SDPACoreAttention
    from tri_megatron.model.config import transformer_config
    from megatron.core.transformer.enums import AttnMaskType

    args = load_run_config(["--mock-data", "--window-size", "3", "--no-rope-freq", "4", "--window-attn-skip-freq", "4"], world_size=1, rank=0)
    cfg = transformer_config(args, False)
    attn = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, h, g, d = 6, 2, 4, 2, 32
    q, k, v = torch.randn(s, b, h, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    out = attn(q, k, v, None)
    # naive: repeat KV groups, causal mask limited to the 3 most recent keys (itself included)
    kr, vr = k.repeat_interleave(h // g, dim=2), v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kr) / math.sqrt(d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & (j > i - 3)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.einsum("bhst,tbhd->sbhd", probs, vr).reshape(s, b, h * d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # layer 4 is a full-attention (NoPE) layer
    full = SDPACoreAttention(cfg, layer_number=4, attn_mask_type=AttnMaskType.causal, attention_type="self")
    assert full.window is None and attn.window == (2, 0)


@pytest.mark.parametrize("features", [[], ["--ssmax", "--no-rope-freq", "4"],
                                      ["--no-rope-freq", "4", "--attn-temperature-tuning", "--attn-floor-scale", "4"]],
                         ids=["rope", "ssmax_irope", "temperature"])
def test_fused_rope_path_matches_megatron_rope(megatron_single_process, features):
    """Core attention doing RoPE + scaling in one op gives the logits of megatron's own RoPE followed
    by the scaling alone; gradients too."""
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config

    args = load_run_config(["--mock-data", "--seq-length", "32", *features], world_size=1, rank=0)
    model = build_model_chunks(transformer_config(args, False), args, False)[0]
    cores = [m for m in model.modules() if hasattr(m, "fuse_rope")]
    assert cores
    tokens = torch.randint(0, args.arch.vocab_size, (2, 32))
    pos = torch.arange(32).expand(2, -1)

    def run(fused: bool):
        for c in cores:
            c.fuse_rope = fused
            if not fused:  # megatron rotates q, k; then only the query factor
                c._rope_and_scale = (lambda q, k, p, c=c: (c.query_scaling(q) if c.query_scaling is not None else q, k))
            elif "_rope_and_scale" in c.__dict__:
                del c._rope_and_scale
        model.zero_grad()
        logits = model(tokens, pos, None)
        logits.float().pow(2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_grads = run(False)
    got_logits, got_grads = run(True)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap_grad_reduce"])
def test_fused_loss_under_ddp_accumulates_into_main_grad(megatron_single_process, overlap):
    """Under megatron's DDP the fused loss adds the output-layer gradient straight into main_grad (no
    weight-sized fp32 accumulator of its own) and every main_grad equals the unfused model's .grad."""
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config
    from tri_megatron.training.optimizer import wrap_ddp

    def build(extra):
        args = load_run_config(["--mock-data", "--seq-length", "32", "--mtp-num-layers", "2", *extra], world_size=1, rank=0)
        cfg = transformer_config(args, False)
        return build_model_chunks(cfg, args, False)[0], cfg, args

    fused, cfg, args = build(["--fused-loss", *(["--overlap-grad-reduce"] if overlap else [])])
    ref, _, _ = build(["--no-fused-loss"])
    ref.load_state_dict(fused.state_dict())
    ddp = wrap_ddp([fused], cfg, args.parallel)[0]
    tokens = torch.randint(0, args.arch.vocab_size, (2, 32))
    labels = torch.randint(0, args.arch.vocab_size, (2, 32))
    pos = torch.arange(32).expand(2, -1)
    mask = (torch.rand(2, 32) > 0.2).float()

    def loss_of(model):
        per_token = model(tokens, pos, None, labels=labels, loss_mask=mask)
        return (per_token * mask).sum() / mask.sum()

    got = loss_of(ddp)
    got.backward()
    if overlap:
        ddp.finish_grad_sync()
    want = loss_of(ref)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weight = fused.output_layer.weight
    assert weight.grad_added_to_main_grad is True and weight.grad is None
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("features", [["--ssmax", "--no-rope-freq", "4"],
                                      ["--no-rope-freq", "4", "--attn-temperature-tuning", "--attn-floor-scale", "4",
                                       "--window-size", "8", "--window-attn-skip-freq", "4"]],
                         ids=["ssmax_irope", "tri70b_style"])
def test_model_on_emulated_kernels_matches_reference_path(megatron_single_process, monkeypatch, features):
    """The whole model (fused RoPE+query scale in every layer, fused main + MTP loss) run through the
    real csrc/kernels source on the CPU emulator gives the reference path's loss and gradients."""
    from kernel_emulator import EmulatedKernels
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config
    from tri_megatron.ops import ce_heads, rope_ssmax

    args = load_run_config(["--mock-data", "--seq-length", "32", "--mtp-num-layers", "1", "--fused-loss",
                       *features], world_size=1, rank=0)
    model = build_model_chunks(transformer_config(args, False), args, False)[0]
    cores = [m for m in model.modules() if hasattr(m, "fuse_rope")]
    assert any(c.fuse_rope for c in cores)
    for c in cores:  # plain-RoPE layers too, as on a GPU with the kernels built and no TE
        c.fuse_rope = True
    tokens = torch.randint(0, args.arch.vocab_size, (2, 32))
    labels = torch.randint(0, args.arch.vocab_size, (2, 32))
    pos = torch.arange(32).expand(2, -1)

    def run(kern):
        for mod in (ce_heads, rope_ssmax):
            monkeypatch.setattr(mod, "use_kernels_for", lambda *t: kern)
        model.zero_grad()
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    kern = EmulatedKernels()
    got_loss, got_grads = run(kern)
    assert "ce_backward_inplace" in kern.calls and ("rope_query_scale", True) in kern.calls
    ref_loss, ref_grads = run(None)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
