"""Device correctness (issue 12): the virtual accelerator itself, batches and model on the device, the
one device decision (no silent CPU fallback, ranks agree), context-parallel batches, sliding windows
without a dense mask, and checkpoints that never carry RNG states across devices.

The virtual accelerator (tri_megatron/compat/virtual.py) is what makes these checkable on a machine
without a GPU: "cuda" tensors are host tensors underneath, tracked, and any op mixing them with host
tensors raises as CUDA does.
"""

import argparse
import json
import math
import os

import pytest
import torch

from launcher import TINY, run, train


# ----------------------------------------------------------------------------- the virtual device
def test_virtual_device_rejects_host_tensors_like_a_gpu(virtual_device):
    from tri_megatron.compat import DeviceMismatchError, is_device_tensor

    x = torch.randn(4, 3, device="cuda")
    host = torch.randn(4, 3)
    assert x.is_cuda and x.device == torch.device("cuda", 0) and x.get_device() == 0
    assert not host.is_cuda and host.device.type == "cpu"
    with pytest.raises(DeviceMismatchError, match="aten.add"):
        x + host
    # as in CUDA: 0-dim host tensors are scalars
    assert (x * torch.tensor(2.0)).is_cuda
    # .cuda() / .to("cuda") copy; the host tensor stays on the host
    y = host.cuda()
    assert y.is_cuda and not host.is_cuda and (x + y).is_cuda
    assert host.to("cuda").is_cuda and host.to(x).is_cuda and host.to(x.device).is_cuda
    # .cpu() / .to("cpu") give host tensors that may not meet device tensors
    back = x.cpu()
    assert not back.is_cuda and x.is_cuda and not x.to("cpu").is_cuda
    with pytest.raises(DeviceMismatchError):
        x - back
    with pytest.raises(DeviceMismatchError, match="numpy"):
        x.numpy()
    # device=x.device lands on the device; views and .data swaps follow their storage
    assert torch.zeros(3, device=x.device).is_cuda and x[1:].is_cuda and x.t().is_cuda
    assert torch.as_tensor(host, device="cuda").is_cuda and not host.is_cuda
    p = torch.nn.Parameter(torch.zeros(3))
    p.data = torch.zeros(3, device="cuda")
    assert p.is_cuda
    # modules: parameters and buffers move with .to("cuda")
    lin = torch.nn.Linear(3, 2)
    lin.register_buffer("b", torch.ones(2))
    with pytest.raises(DeviceMismatchError, match="host tensor of shape"):
        lin(x)
    lin.to("cuda")
    assert all(is_device_tensor(t) for t in [*lin.parameters(), *lin.buffers()])
    assert lin(x).is_cuda
    # indexing a device tensor with host indices is allowed, as in CUDA
    x[torch.tensor([0, 1])] = 1.0


def test_virtual_device_follows_every_form_of_to(virtual_device):
    h, d = torch.ones(3), torch.ones(3, device="cuda")
    to_device = [h.to("cuda"), h.to(0), h.cuda(0), h.to(device="cuda", copy=True), h.to(d, non_blocking=True),
                 h.to("cuda", torch.float64), d.to(torch.float16), d.float(), d.half(), d.to("cuda"),
                 d.new_tensor([1.0]), torch.full_like(d, 2), torch.empty_like(h, device="cuda"),
                 torch.nn.Linear(2, 2).to("cuda", torch.float64).weight]
    to_host = [d.to("cpu", torch.float64), d.to(device="cpu", copy=True), d.cpu(), h.to(torch.float16), h.float()]
    assert all(t.is_cuda for t in to_device) and not any(t.is_cuda for t in to_host)
    assert d.is_cuda and not h.is_cuda


def test_virtual_device_sdpa_temporaries_follow_its_inputs(virtual_device):
    """SDPA's math path builds its causal mask inside C++ with its inputs' options: device tensors, as on
    a GPU (torch 2.6 takes that path for every CPU call with ``enable_gqa``); host inputs stay on the host."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tri_megatron.compat import DeviceMismatchError

    q = torch.randn(1, 4, 8, 16, device="cuda", requires_grad=True)
    k, v = torch.randn(1, 2, 8, 16, device="cuda"), torch.randn(1, 2, 8, 16, device="cuda")
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()
        assert out.is_cuda and q.grad.is_cuda
        host = torch.nn.functional.scaled_dot_product_attention(q.detach().cpu(), k.cpu(), v.cpu(), is_causal=True,
                                                                enable_gqa=True)
        assert not host.is_cuda and torch.allclose(host, out.detach().cpu(), atol=1e-6)
        with pytest.raises(DeviceMismatchError):  # a host tensor among its inputs is still caught
            torch.nn.functional.scaled_dot_product_attention(q, k.cpu(), v, is_causal=True, enable_gqa=True)


def test_virtual_device_checks_the_backward_pass(virtual_device):
    """Backward ops go through the same check: a host tensor captured by a backward function raises."""
    from tri_megatron.compat import DeviceMismatchError

    host = torch.ones(3)

    class ScaleByHost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * host  # a host tensor met in backward only

    w = torch.ones(3, device="cuda", requires_grad=True)
    out = ScaleByHost.apply(w).sum()
    with pytest.raises(DeviceMismatchError):
        out.backward()
    w2 = torch.ones(3, device="cuda", requires_grad=True)
    (w2 * 3).sum().backward()
    assert w2.grad.is_cuda


# ----------------------------------------------------------------------------- item 1: batches
class _Args(argparse.Namespace):
    pass


def _trainer(rt, cp: int = 1):
    from tri_megatron.training.loop import Trainer

    t = object.__new__(Trainer)  # only the step functions: no model, optimizer or data are built
    t.cfg = _Args(parallel=_Args(cp=cp), data=_Args(reset_attention_mask=False))
    t.rt, t._poison = rt, False
    return t


def _host_batch(seq=16, mbs=2):
    from tri_megatron.training.mock_data import micro_batch

    return micro_batch(range(mbs), seq, 100, 1)


def test_forward_step_moves_the_batch_to_the_device(virtual_device):
    from tri_megatron.compat import is_device_tensor

    seen = {}

    def model(tokens, position_ids, attention_mask, labels=None, loss_mask=None):
        seen.update(tokens=tokens, position_ids=position_ids, labels=labels, loss_mask=loss_mask)
        return torch.nn.functional.embedding(tokens, torch.randn(100, 4, device="cuda")).sum(-1)

    trainer = _trainer(virtual_device)
    output, loss_func = trainer._forward_step(iter([_host_batch()]), model)
    assert all(is_device_tensor(v) for v in seen.values()), {k: v.device for k, v in seen.items()}
    loss_sum, num_tokens, logged = loss_func(output)  # the mask meets a device loss
    assert loss_sum.is_cuda and int(num_tokens) == 2 * 16


class _CPGroup:
    """Rank 1 of a context-parallel group of 2, for megatron's split in one process."""

    def size(self):
        return 2

    def rank(self):
        return 1


def test_context_parallel_rank_gets_its_two_sequence_chunks(virtual_device, monkeypatch):
    """CP=2, rank 1: chunks 1 and 2 of 4 (megatron's load-balanced split), on the device. The split reads
    the CP group the trainer passes (megatron-core 0.16 through group.size() / rank(), 0.19 through
    torch.distributed; tests/test_mcore_internals.py runs it on a real group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = _CPGroup()
    monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda *a, **k: group)
    for name, answer in (("get_world_size", 2), ("get_rank", 1)):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda g=None, _r=real, _a=answer, **k: _a if g is group else _r(g, **k))
    batch = _trainer(virtual_device, cp=2)._device_batch(_host_batch(seq=16))
    assert batch["tokens"].shape == (2, 8) and batch["tokens"].is_cuda
    assert batch["position_ids"][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    full = _host_batch(seq=16)
    assert torch.equal(batch["labels"].cpu(), full["labels"][:, 4:12])


# ----------------------------------------------------------------------------- item 2: the model
def _tiny_args(*extra):
    from tri_megatron.config import load_run_config

    return load_run_config(["--mock-data", "--vocab-size", "256", "--seq-length", "32", *extra], world_size=1, rank=0)


def test_model_is_built_on_the_device(virtual_device):
    from tri_megatron.compat import is_device_tensor
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config

    args = _tiny_args("--mtp-num-layers", "1", "--ssmax")
    cfg = transformer_config(args, False, virtual_device)
    assert cfg.use_cpu_initialization is False  # weights created and initialised on the device
    model = build_model_chunks(cfg, args, False, virtual_device)[0]
    on_host = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not is_device_tensor(t)]
    assert not on_host, on_host


def test_config_follows_the_runtime_not_cuda_availability(megatron_single_process):
    from tri_megatron.model.config import transformer_config
    from tri_megatron.runtime import Runtime

    args = _tiny_args()
    cpu = transformer_config(args, False, Runtime("cpu", "gloo"))
    virtual = transformer_config(args, False, Runtime("cuda", "gloo", virtual=True))
    assert cpu.use_cpu_initialization and not cpu.batch_p2p_comm
    assert not virtual.use_cpu_initialization and not virtual.batch_p2p_comm  # gloo: p2p one by one
    assert not virtual.bias_activation_fusion  # no CUDA kernels behind the virtual device


# ----------------------------------------------------------------------------- item 4 / deliver 3
def _resolve(env, requested="auto", **kw):
    from tri_megatron.runtime import resolve

    return resolve(requested, environ=env, cuda_available=False, nvidia_devices=False, **kw)


def test_auto_falls_back_to_cpu_only_where_no_gpu_was_expected(monkeypatch):
    from tri_megatron.runtime import DeviceError

    assert _resolve({}).device_type == "cpu"
    assert _resolve({"LOCAL_WORLD_SIZE": "2"}).device_type == "cpu"  # torchrun on a CPU box
    cases = {
        "SLURM job 7 with 16 tasks": {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"},
        "SLURM_GPUS_ON_NODE=8": {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_GPUS_ON_NODE": "8"},
        "multi-process launch": {"LOCAL_WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
    }
    for expected, env in cases.items():
        with pytest.raises(DeviceError) as e:
            _resolve(env)
        msg = str(e.value)
        assert expected in msg and "--device cpu" in msg and "\n" not in msg, msg
        assert _resolve(env, "cpu").device_type == "cpu"  # deliberate CPU training stays possible
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch (whichever build runs this test)
    with pytest.raises(DeviceError, match="CPU-only build"):
        _resolve({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    # a CUDA build: the cause is the binding, or the CUDA runtime's own words about the driver
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DeviceError, match="bound no GPU"):
        _resolve({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "CUDA_VISIBLE_DEVICES": ""})

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).")

    with pytest.raises(DeviceError, match="driver on your system is too old.*CUDA 13.0"):
        _resolve({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, cuda_init=old_driver)
    with pytest.raises(DeviceError, match="--device cuda"):
        _resolve({}, "cuda", cuda_init=old_driver)
    # the CPU tests' virtual device
    rt = _resolve({"TRI_VIRTUAL_DEVICE": "1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    assert rt.device_type == "cuda" and rt.virtual and rt.backend == "gloo"
    # where CUDA is usable it is used, whatever the environment
    from tri_megatron.runtime import resolve

    real = resolve("auto", environ={"TRI_VIRTUAL_DEVICE": "1"}, cuda_available=True)
    assert real.cuda_kernels and real.backend == "nccl" and real.batch_p2p_comm
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES="):
        resolve("cpu", environ={}, cuda_available=True)


def test_ranks_that_decide_differently_stop_before_any_process_group():
    from tri_megatron.runtime import DeviceError, Runtime, agree

    store = torch.distributed.HashStore()
    cuda, cpu = Runtime("cuda", "nccl", reason="--device auto"), Runtime("cpu", "gloo", reason="no CUDA device")
    store.set("tri_runtime/rank1", f"{cpu.signature()}|{cpu.reason}")  # what rank 1 wrote
    with pytest.raises(DeviceError, match=r"rank 0 cuda/nccl.*rank 1 cpu/gloo \(no CUDA device\)"):
        agree(store, cuda, 0, 2, timeout_s=5)
    agreeing = torch.distributed.HashStore()
    agreeing.set("tri_runtime/rank1", f"{cuda.signature()}|x")
    agree(agreeing, cuda, 0, 2, timeout_s=5)


def test_gpu_job_without_cuda_exits_2_before_anything(tmp_path):
    """Under SLURM with 2 tasks and no usable CUDA, --device auto stops with one line (it trained on
    CPUs, or waited for the other task, before)."""
    save = tmp_path / "ckpt"
    proc = run(1, [*TINY, "--train-iters", "1", "--save", str(save)], check=False, timeout=120, virtual=False,
               extra_env={"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                          "SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLURM job 4242 with 2 tasks" in lines[0] and "--device cpu" in lines[0], lines
    assert not save.exists()


# ----------------------------------------------------------------------------- item 6: CP > 1
CP_FLAGS = TINY + ["--no-rope-freq", "4", "--window-size", "16", "--window-attn-skip-freq", "4"]


CP_LAYOUTS = {"cp2": (2, ["--context-parallel-size", "2"]),
              "cp2_tp2_sp": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                 "--sequence-parallel"])}


@pytest.mark.parametrize("layout", sorted(CP_LAYOUTS))
def test_context_parallel_matches_single_process(tmp_path, layout):
    init = str(tmp_path / "init")
    train(1, [*CP_FLAGS, "--train-iters", "0", "--save", init, "--no-save-optim"], str(tmp_path / "i.jsonl"))
    ref = train(1, [*CP_FLAGS, "--train-iters", "3", "--load", init], str(tmp_path / "ref.jsonl"))
    nproc, flags = CP_LAYOUTS[layout]
    got = train(nproc, [*CP_FLAGS, *flags, "--train-iters", "3", "--load", init], str(tmp_path / f"{layout}.jsonl"))
    assert len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        assert abs(r["lm_loss"] - g["lm_loss"]) <= 1e-5, (r["iteration"], r["lm_loss"], g["lm_loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4, abs=1e-6)
    assert len({round(r["lm_loss"], 6) for r in got}) > 1


# ----------------------------------------------------------------------------- item 8: windows
def test_sliding_window_attends_in_blocks_without_a_dense_mask(megatron_single_process, monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType

    from tri_megatron.model.attention import SDPACoreAttention
    from tri_megatron.model.config import transformer_config

    args = _tiny_args("--window-size", "16", "--no-rope-freq", "4", "--window-attn-skip-freq", "4")
    cfg = transformer_config(args, False)
    attn = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    attn.window_block = 32
    s, b, h, g, d = 128, 2, 4, 2, cfg.kv_channels
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, generator=gen, requires_grad=True) for n in (h, g, g))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, attn_mask=None, **kw):
        masks.append(None if attn_mask is None else attn_mask.numel())
        return sdpa(*a, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = attn(q, k, v, None)
    assert masks and max(masks) <= 32 * (32 + 15) < s * s, masks  # never [s, s]
    # reference: plain softmax attention with the window mask, values and gradients
    kr, vr = k.repeat_interleave(h // g, dim=2), v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kr) / math.sqrt(d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    probs = scores.masked_fill(~((j <= i) & (j > i - 16)), float("-inf")).softmax(-1)
    expected = torch.einsum("bhst,tbhd->sbhd", probs, vr).reshape(s, b, h * d)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_records_the_runtime_and_rng_never_crosses_devices(tmp_path):
    ckpt = tmp_path / "ckpt"
    train(1, [*TINY, "--device", "cpu", "--train-iters", "2", "--save", str(ckpt)], str(tmp_path / "a.jsonl"))
    meta = json.load(open(ckpt / "iter_0000002" / "tri_meta.json"))
    assert meta["runtime"] == {"device": "cpu", "backend": "gloo", "virtual": False}
    same = run(1, [*TINY, "--device", "cpu", "--train-iters", "3", "--load", str(ckpt)])
    assert "RNG states not restored" not in same.stdout
    other = run(1, [*TINY, "--train-iters", "3", "--load", str(ckpt)], virtual=True)
    assert "RNG states not restored (the checkpoint was written on cpu/gloo and this run is on cuda (virtual)/gloo)" \
        in other.stdout, other.stdout
