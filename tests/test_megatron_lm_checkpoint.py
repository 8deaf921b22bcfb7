"""A checkpoint written the way Megatron-LM's pretrain_gpt.py writes one (megatron-core GPTModel with the
local Llama-style spec, RMSNorm + SwiGLU + RoPE + GQA, untied output, saved by dist_checkpointing in the
torch_dist format with Megatron-LM's common state: args, iteration, checkpoint_version) reaches a
tri_megatron run: --load names it and the conversion; converted through Hugging Face it loads with --load,
every weight intact."""

import os
import subprocess
import sys

import pytest
import torch

from launcher import ROOT, run

DIMS = dict(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
            kv_channels=16)
VOCAB, CONTEXT, ITERATION = 256, 128, 10
ARCH_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--kv-channels", "16", "--vocab-size", str(VOCAB),
              "--max-position-embeddings", str(CONTEXT), "--seq-length", "64"]


def write_megatron_lm_checkpoint(out: str) -> None:
    """What Megatron-LM's save_checkpoint writes for this model (without --save-optim state): the model's
    sharded state dict plus its common state, under iter_0000010/ and the tracker."""
    from argparse import Namespace

    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tri_megatron.local_dist import init_single_process

    init_single_process()
    torch.manual_seed(0)
    config = TransformerConfig(**DIMS, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                               add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                               layernorm_epsilon=1e-5, init_method_std=0.02, use_cpu_initialization=True,
                               bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                               apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                     max_sequence_length=CONTEXT, position_embedding_type="rope", rotary_base=10000,
                     share_embeddings_and_output_weights=False)
    with torch.no_grad():  # RMSNorm weights away from 1, so a lost or shifted norm shows
        for name, p in model.named_parameters():
            if "layernorm" in name or "final_layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    args = Namespace(**DIMS, group_query_attention=True, normalization="RMSNorm", swiglu=True,
                     untie_embeddings_and_output_weights=True, position_embedding_type="rope", rotary_base=10000,
                     norm_epsilon=1e-5, max_position_embeddings=CONTEXT, seq_length=64, vocab_size=None,
                     padded_vocab_size=VOCAB, apply_layernorm_1p=False, consumed_train_samples=ITERATION * 8,
                     tensor_model_parallel_size=1, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
                     use_dist_ckpt=True, mtp_num_layers=None)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "num_floating_point_operations_so_far": 0, "model": model.sharded_state_dict()}
    it_dir = os.path.join(out, f"iter_{ITERATION:07d}")
    os.makedirs(it_dir)
    dist_checkpointing.save(state, it_dir)
    with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))
    weights = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    torch.save(weights, os.path.join(os.path.dirname(out), "reference.pt"))  # outside the checkpoint


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    out = str(root / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, __file__, out], check=True, env=env, cwd=ROOT, timeout=300,
                   capture_output=True)
    return root


def _moments(tensors):
    """numel, sum and sum of squares over all tensors: unchanged by renaming, splitting or fusing them."""
    ts = [t.double() for t in tensors]
    return sum(t.numel() for t in ts), float(sum(t.sum() for t in ts)), float(sum((t * t).sum() for t in ts))


def test_load_names_megatron_lm_checkpoint_and_the_conversion(megatron_lm):
    from tri_megatron.config import ArgumentError, load_run_config

    with pytest.raises(ArgumentError, match="written by Megatron-LM .*--to-hf .*--from-hf") as e:
        load_run_config(["--mock-data", *ARCH_FLAGS, "--load", str(megatron_lm / "ckpt")], world_size=1, rank=0)
    assert "\n" not in str(e.value)


def test_converted_megatron_lm_checkpoint_loads_with_every_weight(megatron_lm, tmp_path):
    py = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    hf, tri = tmp_path / "hf", tmp_path / "tri"
    for argv in (["--to-hf", str(megatron_lm / "ckpt"), str(hf)], ["--from-hf", str(hf), str(tri)]):
        proc = subprocess.run([*py, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint

    reference = torch.load(megatron_lm / "reference.pt")
    converted = MegatronCheckpoint(str(tri)).canonical_state_dict()
    assert _moments(converted.values()) == pytest.approx(_moments(reference.values()), rel=1e-6)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        assert torch.equal(converted[name], reference[name]), name

    # and a tri_megatron run continues from it
    save = tmp_path / "run"
    proc = run(1, ["--mock-data", *ARCH_FLAGS, "--micro-batch-size", "2", "--global-batch-size", "2",
                   "--train-iters", "1", "--load", str(tri), "--finetune", "--save", str(save), "--no-save-optim"])
    assert "iter      1/1 | loss" in proc.stdout, proc.stdout[-2000:]


if __name__ == "__main__":
    write_megatron_lm_checkpoint(sys.argv[1])
