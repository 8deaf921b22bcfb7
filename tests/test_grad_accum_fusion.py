"""Issue 12 item 3: a Transformer Engine config must not switch on gradient-accumulation fusion for
megatron's own linears (the output layer is megatron's ``ColumnParallelLinear`` under every spec)
unless apex's ``fused_weight_gradient_mlp_cuda`` is there: without it the layer raises at build.

The GPU + TE + no-apex node is simulated while the config is built: CUDA reported available, TE's
fused RoPE present (megatron's config checks it), and megatron's own record of the apex import
(``layers._grad_accum_fusion_available``) patched.
"""

import pytest
import torch


def _te_config(monkeypatch, apex: bool):
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers

    from tri_megatron.config import load_run_config
    from tri_megatron.model.config import transformer_config

    args = load_run_config(["--mock-data", "--bf16", "--vocab-size", "1024"], world_size=1, rank=0)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(layers, "_grad_accum_fusion_available", apex)
        # TE present: megatron's config check of the TE RoPE fusion finds its kernel
        m.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
        cfg = transformer_config(args, use_te=True)
    cfg.use_cpu_initialization = True  # the layer below is built on this CPU machine
    return cfg


def _output_layer(cfg):
    """The output layer exactly as megatron's GPTModel builds it (also under the TE spec)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear(cfg.hidden_size, 1024, config=cfg, init_method=cfg.init_method, bias=False,
                                skip_bias_add=False, gather_output=False)


def test_te_without_apex_builds_the_output_layer(megatron_single_process, monkeypatch):
    from megatron.core.tensor_parallel import layers

    cfg = _te_config(monkeypatch, apex=False)
    assert not cfg.gradient_accumulation_fusion
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    layer = _output_layer(cfg)  # raised "fused_weight_gradient_mlp_cuda module is not found" before
    assert layer.gradient_accumulation_fusion is False


def test_te_with_apex_keeps_the_fusion(megatron_single_process, monkeypatch):
    """With apex the fusion stays on (and so the CUDA simulation above really reached the config)."""
    from megatron.core.tensor_parallel import layers

    cfg = _te_config(monkeypatch, apex=True)
    assert cfg.gradient_accumulation_fusion
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    assert _output_layer(cfg).gradient_accumulation_fusion is True
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        _output_layer(cfg)  # the check this config must never meet on a node without apex
