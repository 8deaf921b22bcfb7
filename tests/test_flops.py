"""FLOP accounting (tri_megatron/perf/flops.py) against hand counts, Megatron-LM's closed form,
the matmuls the built model actually executes, and the design's Tri-21B sanity figure."""

import pytest

from tri_megatron.config.arch import ModelArch
from tri_megatron.perf import devices, flops
from tri_megatron.config.presets import PRESETS

S = 8  # the small configs' sequence length


def _arch(**kw) -> ModelArch:
    base = dict(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                kv_channels=4, vocab_size=128, context_length=S)
    base.update(kw)
    return ModelArch(**base)


def test_tri21b_is_130_6_gflop_per_token():
    arch = PRESETS["tri-21b"].arch
    per_token = flops.model_flops_per_token(arch, arch.context_length)
    assert per_token == pytest.approx(130.6e9, rel=5e-4)
    assert per_token * 2.3e12 == pytest.approx(3.0e23, rel=5e-3)  # the DESIGN.md cross-check


def test_hand_count_small_config_with_gqa_and_mtp():
    # h=8, f=16, 2 query heads / 1 KV group of dim 4 (q=8, kv=4), vocab 128 (already a multiple of 128), s=8, MTP D=1.
    # per layer forward per token: QKV 2*8*(8+2*4)=256, attention 2*2*8*(8/2)=128, proj 2*8*8=128, SwiGLU 2*3*8*16=768
    layer = 256 + 128 + 128 + 768
    # 2 decoder layers + 1 MTP layer; MTP eh_proj 2*(2*8)*8=256 and Megatron's norm term 2*3*8=48;
    # output layer 2*8*128 once for the main head and once for the MTP head.
    forward = 3 * layer + 256 + 48 + 2 * (2 * 8 * 128)
    assert forward == 8240
    arch = _arch(mtp_num_layers=1)
    batch_tokens = 2 * 8
    assert flops.model_flops_per_iteration(arch, S, batch_tokens) == 3 * forward * batch_tokens == 395520
    assert flops.hardware_flops_per_iteration(arch, S, batch_tokens) == 395520  # no recomputation
    b = flops.forward_flops_breakdown(arch, S)
    assert (b["qkv"], b["attention"], b["proj"], b["mlp"]) == (768, 384, 384, 2304)
    assert (b["mtp_proj"], b["mtp_norm"], b["logits"]) == (256, 48, 4096)


def test_hand_count_sliding_windows_and_full_attention_convention():
    # window 4 on layers with n % 2 != 0 (layers 1 and 3 = the MTP layer), full causal attention on layer 2.
    arch = _arch(mtp_num_layers=1, window_size=4, window_attn_skip_freq=2)
    assert [flops.attended_keys(arch, S, n) for n in (1, 2, 3)] == [4 * (1 - 4 / 16), 4.0, 3.0]
    assert [flops.attended_keys(arch, S, n, "full") for n in (1, 2, 3)] == [4.0, 8.0, 4.0]
    causal = flops.forward_flops_breakdown(arch, S)["attention"]
    full = flops.forward_flops_breakdown(arch, S, attention="full")["attention"]
    assert causal == 2 * 2 * 8 * (3 + 4 + 3)
    assert full == 2 * 2 * 8 * (4 + 8 + 4)
    diff = flops.model_flops_per_iteration(arch, S, 1, attention="full") - flops.model_flops_per_iteration(arch, S, 1)
    assert diff == 3 * (full - causal)
    # a window as long as the sequence is plain causal attention (Megatron's s/2)
    assert flops.attended_keys(_arch(window_size=8), S, 1) == 4.0


def _megatron_closed_form(B, s, L, h, heads, groups, kv_channels, f, V, swiglu=True):
    """Megatron-LM's num_floating_point_operations for a plain GPT, written as its closed form:
    12 B s L h^2 [ (1 + G/H + s/(2h)) * (H d / h) + (f/h) * (3/2 if SwiGLU else 1) + V / (2 L h) ]."""
    expansion = 12
    ratio = kv_channels * heads / h
    gated = 3 / 2 if swiglu else 1
    return expansion * B * s * L * h * h * (
        (1 + groups / heads + s / h / 2) * ratio
        + (f / h) * gated
        + V / (2 * L * h)
    )


@pytest.mark.parametrize("cfg", [
    dict(L=24, h=2048, heads=16, groups=16, kv=128, f=5632, V=50304, s=2048),  # MHA, SwiGLU
    dict(L=32, h=4096, heads=32, groups=8, kv=128, f=14336, V=128256, s=8192),  # GQA (Llama-3-8B-like)
    dict(L=40, h=5120, heads=32, groups=8, kv=160, f=27392, V=124416, s=8192),  # Tri-21B dims
    dict(L=12, h=768, heads=12, groups=4, kv=96, f=2000, V=32000, s=1024),  # kv_channels != h/heads
])
def test_matches_megatron_closed_form_for_plain_gpt(cfg):
    B = 3
    arch = _arch(num_layers=cfg["L"], hidden_size=cfg["h"], ffn_hidden_size=cfg["f"], num_attention_heads=cfg["heads"],
                 num_query_groups=cfg["groups"], kv_channels=cfg["kv"], vocab_size=cfg["V"], context_length=cfg["s"])
    padded = -(-cfg["V"] // 128) * 128  # Megatron counts the padded vocabulary
    expected = _megatron_closed_form(B, cfg["s"], cfg["L"], cfg["h"], cfg["heads"], cfg["groups"], cfg["kv"], cfg["f"],
                                     padded)
    assert flops.model_flops_per_iteration(arch, cfg["s"], B * cfg["s"]) == pytest.approx(expected, rel=1e-12)


def test_matches_megatron_mtp_terms():
    # Megatron-LM adds per MTP layer: a full extra layer, 6 * (3h + 2h^2), and one more logits pass.
    L, h, f, heads, groups, kv, V, s, D = 8, 256, 704, 8, 2, 32, 1000, 512, 2
    arch = _arch(num_layers=L, hidden_size=h, ffn_hidden_size=f, num_attention_heads=heads, num_query_groups=groups,
                 kv_channels=kv, vocab_size=V, context_length=s, mtp_num_layers=D)
    Vp = 1024
    q, kvs = heads * kv, groups * kv
    attn = 6 * (h * (q + 2 * kvs) + q * s / 2 * 2 + q * h)
    expected_per_token = (L + D) * (6 * h * f * 3 + attn) + 6 * D * (3 * h + 2 * h * h) + 6 * h * Vp * (1 + D)
    assert flops.model_flops_per_iteration(arch, s, 1) == pytest.approx(expected_per_token, rel=1e-12)


def test_recomputation_adds_forward_work():
    arch = _arch(num_layers=8, mtp_num_layers=1)

    def hardware(**recompute):
        return flops.hardware_flops_per_iteration(arch, S, 1, pp=2, vpp=2, **recompute)

    model = flops.model_flops_per_iteration(arch, S, 1)
    b = flops.forward_flops_breakdown(arch, S)
    layer = (b["qkv"] + b["attention"] + b["proj"] + b["mlp"]) / 9  # 8 decoder + 1 MTP layer, no windows
    assert hardware(recompute_granularity="selective") - model == pytest.approx(b["attention"])
    uni = hardware(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # every decoder layer and the MTP layer with its projection; never the output layer
    assert uni - model == pytest.approx(9 * layer + b["mtp_proj"])
    blk = hardware(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
    # 8 layers over PP=2 x VPP=2: chunks of 2 layers; block recomputes the first layer of each chunk (1, 3, 5, 7)
    assert blk - model == pytest.approx(4 * layer)


def test_stage_layers_and_stage_flops_add_up_to_the_model():
    assert flops.stage_layer_numbers(8, 2, 2, 0) == [1, 2, 5, 6]
    assert flops.stage_layer_numbers(8, 2, 2, 1) == [3, 4, 7, 8]
    assert flops.stage_layer_numbers(40, 4, 1, 3) == list(range(31, 41))
    for name, over in [("tri-21b", {}), ("tri-70b", {"mtp_num_layers": 1, "seq_length": 8192}), ("tri-7b", {})]:
        arch = PRESETS[name].arch.replace(**{k: v for k, v in over.items() if k != "seq_length"})
        s = over.get("seq_length", arch.context_length)
        for tp, pp, vpp in [(1, 1, 1), (4, 4, 1), (8, 4, 5), (2, 8, 2), (2, 8, 1)]:
            if arch.num_layers % (pp * vpp):
                continue
            rc = {"granularity": "selective"}
            stages = [flops.stage_flops_per_token(arch, s, pp, vpp, r, tp=tp, recompute=rc) for r in range(pp)]
            assert sum(st["model"] for st in stages) * tp == pytest.approx(flops.model_flops_per_token(arch, s),
                                                                          rel=1e-12)
            extra = flops.recompute_flops_per_token(arch, s, "selective")
            assert sum(st["hardware"] for st in stages) * tp == pytest.approx(
                flops.model_flops_per_token(arch, s) + extra, rel=1e-12)
            assert stages[-1]["post_process"] and stages[0]["pre_process"]


def test_peak_table_and_detection():
    assert devices.peak_tflops_for_device("NVIDIA H100 80GB HBM3") == 989.0
    assert devices.peak_tflops_for_device("NVIDIA H100 PCIe") == 756.0
    assert devices.peak_tflops_for_device("NVIDIA H200") == 989.0
    assert devices.peak_tflops_for_device("NVIDIA B200") == 2250.0
    assert devices.peak_tflops_for_device("NVIDIA GB200") == 2500.0
    assert devices.peak_tflops_for_device("Some CPU") is None
    import torch

    if not torch.cuda.is_available():
        assert devices.detect_peak_tflops() is None


def test_parsed_flags_feed_the_counter():
    from tri_megatron.config.run import load_run_config

    cfg = load_run_config(["--mock-data", "--model", "tri-70b", "--seq-length", "8192", "--recompute-granularity",
                           "full", "--pipeline-model-parallel-size", "4", "--global-batch-size", "8",
                           "--micro-batch-size", "1"], world_size=4, rank=0)
    arch, s = cfg.arch, cfg.training.seq_length
    assert (arch.window_size, arch.window_attn_skip_freq, arch.padded_vocab_size()) == (4096, 4, 124416)
    tokens = 8 * 8192
    model = flops.model_flops_per_iteration(arch, s, tokens)
    assert model == pytest.approx(tokens * flops.model_flops_per_token(arch, s))
    hardware = flops.hardware_flops_per_iteration(arch, s, tokens, **cfg.training.recompute(), pp=cfg.parallel.pp,
                                                  vpp=cfg.parallel.vpp)
    assert hardware > model  # full uniform recomputation


def test_counts_the_matmuls_the_model_executes(megatron_single_process):
    """Forward of the built megatron-core model (SDPA on its math path, so attention runs as matmuls over
    the full s x s scores) executes exactly the 'full'-convention GEMM FLOPs we count (less Megatron's
    3h MTP norm term, which is no matmul); backward executes exactly twice the forward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tri_megatron.config.run import load_run_config
    from tri_megatron.model.builder import build_gpt_model
    from tri_megatron.model.config import transformer_config

    cfg = load_run_config(["--mock-data", "--seq-length", "32", "--mtp-num-layers", "1", "--no-fused-loss"],
                          world_size=1, rank=0)
    model = build_gpt_model(transformer_config(cfg, False), cfg, False, True, True)
    b, s = 2, cfg.training.seq_length
    tokens = torch.randint(0, cfg.arch.vocab_size, (b, s))
    position_ids = torch.arange(s).expand(b, s)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = model(tokens, position_ids, None, labels=tokens)
        forward = counter.get_total_flops()
        loss.sum().backward()
    total = counter.get_total_flops()
    b_full = flops.forward_flops_breakdown(cfg.arch, s, attention="full")
    expected_forward = (sum(b_full.values()) - b_full["mtp_norm"]) * b * s
    assert forward == expected_forward
    assert total == 3 * forward
