"""Pins the megatron-core internals that tri_megatron.mcore_internals relies on, one seam at a time.

An upgrade of megatron-core that moves one of these fails here, naming the seam, rather than in a
long training run. Verified with megatron-core 0.16.1 (our lock) and 0.19.0 (NGC containers); the
focused pass on 0.19 (.ci/ends.sh) runs this file.
"""

import dataclasses
import inspect

import megatron.core
import pytest
import torch

from tri_megatron import mcore_internals

VERIFIED = "megatron-core 0.16.1 and 0.19.0"
RELEASE = tuple(int(p) for p in megatron.core.__version__.split("+")[0].split(".")[:2])


def _seam(name: str) -> str:
    return (f"megatron-core {megatron.core.__version__}: the seam '{name}' in tri_megatron/mcore_internals/ no "
            f"longer matches (verified with {VERIFIED})")


def _params(fn) -> list:
    return list(inspect.signature(fn).parameters)


# ================================================================ GPTModel._postprocess and the MTP block
def test_postprocess_signature():
    from megatron.core.models.gpt import GPTModel

    params = inspect.signature(GPTModel._postprocess).parameters
    positional = ["self", "hidden_states", "input_ids", "position_ids", "labels", "rotary_pos_emb",
                  "rotary_pos_cos", "rotary_pos_sin"]
    assert list(params)[:len(positional)] == positional, _seam("GPTModel._postprocess positional arguments")
    missing = [k for k in mcore_internals.POSTPROCESS_KWARGS if k not in params]
    assert not missing, _seam(f"GPTModel._postprocess keyword arguments {missing}")
    # GPTModel.forward must call _postprocess by keyword, or our **kwargs override would misroute arguments
    src = inspect.getsource(GPTModel.forward)
    call = src[src.index("self._postprocess("):]
    assert "hidden_states=hidden_states" in call[:200], _seam("GPTModel.forward -> _postprocess by keyword")


def test_mtp_block_accepts_what_we_pass():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock

    params = inspect.signature(MultiTokenPredictionBlock.forward).parameters
    # every keyword argument this release's GPTModel.forward hands to _postprocess
    received = {k: None for k in list(inspect.signature(GPTModel._postprocess).parameters)[8:]}
    passed = mcore_internals.mtp_block_inputs(
        received,
        input_ids=None, position_ids=None, hidden_states=None, rotary_pos_emb=None, rotary_pos_cos=None,
        rotary_pos_sin=None, embedding=None)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in passed if k not in params and not accepts_any]
    assert not unknown, _seam(f"MultiTokenPredictionBlock.forward keyword arguments {unknown}")
    assert "runtime_gather_output" not in passed  # a _postprocess argument that is not the block's


def test_mtp_roll_left_shifts_labels_and_counts_mask_tokens():
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    assert _params(roll_tensor)[:5] == ["tensor", "shifts", "dims", "cp_group", "packed_seq_params"], \
        _seam("roll_tensor(tensor, shifts, dims, cp_group, packed_seq_params)")
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    rolled, _ = mcore_internals.mtp_roll_left(labels)
    assert rolled[:, :3].tolist() == [[6, 7, 8], [2, 3, 4]], _seam("roll_tensor shifts one token left")
    assert rolled[:, 3].tolist() == [0, 0], _seam("roll_tensor zero-fills the last position")
    mask, count = mcore_internals.mtp_roll_left(torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], _seam("roll_tensor on the loss mask")
    assert float(count) == 5.0, _seam("roll_tensor returns the rolled mask's token count")


def test_attach_mtp_loss_scales_its_gradient_by_the_schedule_scale():
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    assert hasattr(MTPLossAutoScaler, "main_loss_backward_scale") and hasattr(MTPLossAutoScaler, "set_loss_scale"), \
        _seam("MTPLossAutoScaler.main_loss_backward_scale / set_loss_scale")
    saved = MTPLossAutoScaler.main_loss_backward_scale
    try:
        MTPLossAutoScaler.set_loss_scale(torch.tensor(0.25))
        main = torch.tensor([2.0, 3.0], requires_grad=True)
        mtp = torch.tensor([1.0, 4.0], requires_grad=True)
        out = mcore_internals.attach_mtp_loss(main.sum(), (mtp * 3.0).sum())
        assert float(out) == 5.0, _seam("MTPLossAutoScaler leaves the main loss's value")
        (out * 8.0).backward()
    finally:
        MTPLossAutoScaler.set_loss_scale(saved)
    assert main.grad.tolist() == [8.0, 8.0], _seam("MTPLossAutoScaler passes the main loss's gradient through")
    # the MTP loss gets the schedule's scale, independent of the main loss's upstream gradient
    assert mtp.grad.tolist() == [0.75, 0.75], _seam("MTPLossAutoScaler's MTP gradient = main_loss_backward_scale")


def _mtp_loss_source() -> str:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import multi_token_prediction

    fn = getattr(multi_token_prediction, "process_mtp_loss", None)
    return inspect.getsource(fn) if fn is not None else inspect.getsource(GPTModel._postprocess)


def test_mtp_loss_normalisation_matches_the_release():
    """The arithmetic the fused loss reproduces (tests/test_fused_loss_schedule.py checks the gradients in
    megatron's schedule against the stock model on both releases; this names the seam)."""
    src = " ".join(_mtp_loss_source().split())
    n, orig, x = torch.tensor(4.0), torch.tensor(6.0), torch.tensor(2.0)
    if RELEASE >= (0, 19):
        assert "original_num_tokens / num_tokens_safe" in src and "num_tokens.clamp(min=1)" in src, \
            _seam("MTP loss normalisation (0.19: per-token loss x original / rolled tokens, counts clamped)")
        assert float(mcore_internals.normalize_mtp_loss(x, True, n, orig)) == 3.0
        assert float(mcore_internals.normalize_mtp_loss(x, False, torch.tensor(0.0), orig)) == 2.0
        assert float(mcore_internals.mtp_loss_for_log(x, torch.tensor(0.0))) == 0.0
    else:
        assert "mtp_loss_scale * mtp_loss / num_tokens" in src and "original_num_tokens" not in src, \
            _seam("MTP loss normalisation (<= 0.18: per-token loss as is, else / rolled tokens)")
        assert float(mcore_internals.normalize_mtp_loss(x, True, n, orig)) == 2.0
        assert float(mcore_internals.mtp_loss_for_log(x, n)) == 0.5
    assert float(mcore_internals.normalize_mtp_loss(x, False, n, orig)) == 0.5
    assert mcore_internals.mtp_heads_detached(_tiny_config(num_layers=1)) is False
    if RELEASE >= (0, 19):  # the fused loss leaves detached MTP heads to megatron's own path
        fields = {f.name for f in dataclasses.fields(_tiny_config(num_layers=1))}
        assert "mtp_detach_heads" in fields, _seam("TransformerConfig.mtp_detach_heads (0.19)")


# ====================================================================== the class-global MTP loss tracker
def test_mtp_tracker_round_trip(megatron_single_process):
    api = mcore_internals.mtp_tracker_api()
    assert api == ("metrics" if RELEASE >= (0, 19) else "loss"), _seam("MTP tracker API")
    mcore_internals.clear_mtp_tracker()
    assert mcore_internals.take_mtp_losses() is None or not mcore_internals.take_mtp_losses().any()
    for loss in (1.5, 0.5):  # two micro-batches on head 1 of 2
        mcore_internals.record_mtp_loss(torch.tensor(loss), 1, 2)
    mcore_internals.record_mtp_loss(torch.tensor(3.0), 0, 2)
    got = mcore_internals.take_mtp_losses()
    assert got is not None, _seam("MTP tracker: recorded losses not found under 'values' / 'loss_values'")
    assert got.tolist() == pytest.approx([3.0, 2.0]), _seam("MTP tracker sums per depth")
    again = mcore_internals.take_mtp_losses()
    assert again is None or not again.any(), _seam("MTP tracker is zeroed after being read")


# ============================================================================ TransformerConfig details
def _tiny_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def test_no_rope_freq_expands_to_decoder_layers_only():
    cfg = _tiny_config(no_rope_freq=2, mtp_num_layers=1)
    assert cfg.no_rope_freq == [0, 1, 0, 1], _seam("no_rope_freq: an int expands to num_layers entries (1 = NoPE)")
    mcore_internals.extend_no_rope_freq_for_mtp(cfg)
    assert cfg.no_rope_freq == [0, 1, 0, 1, 0]
    mcore_internals.extend_no_rope_freq_for_mtp(cfg)  # idempotent
    assert cfg.no_rope_freq == [0, 1, 0, 1, 0]


def test_mtp_transformer_layer_numbers(megatron_single_process):
    """The layer number megatron gives the MTP block's transformer layers (it indexes no_rope_freq)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.attention import SelfAttention

    cfg = _tiny_config(num_layers=2, mtp_num_layers=2)
    spec = get_gpt_layer_local_spec()
    model = GPTModel(cfg, spec, vocab_size=64, max_sequence_length=8,
                     mtp_block_spec=get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False))
    got = [m.layer_number for m in model.mtp.modules() if isinstance(m, SelfAttention)]
    want = [mcore_internals.mtp_transformer_layer_number(2, d) for d in (1, 2)]
    assert got == want, _seam(f"MTP transformer layer numbers {got} (expected {want})")


def test_wgrad_fusion_flag(monkeypatch):
    from megatron.core.tensor_parallel import layers

    assert isinstance(getattr(layers, "_grad_accum_fusion_available", None), bool), \
        _seam("tensor_parallel.layers._grad_accum_fusion_available")
    assert "_grad_accum_fusion_available" in inspect.getsource(layers.ColumnParallelLinear.__init__), \
        _seam("ColumnParallelLinear checks _grad_accum_fusion_available at construction")
    for value in (True, False):
        monkeypatch.setattr(layers, "_grad_accum_fusion_available", value)
        assert mcore_internals.wgrad_fusion_available() is value


# ======================================================================= Attention.forward's RoPE input
def test_transformer_layer_passes_rotary_pos_emb_by_keyword():
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    params = inspect.signature(Attention.forward).parameters
    for name in (mcore_internals.ROPE_KWARG, "inference_context", "inference_params", "packed_seq_params"):
        assert name in params, _seam(f"Attention.forward keyword {name}")
    src = inspect.getsource(TransformerLayer)
    call = src[src.index("self.self_attention("):]
    call = call[:call.index("\n        )")]
    assert f"{mcore_internals.ROPE_KWARG}={mcore_internals.ROPE_KWARG}" in call, \
        _seam("TransformerLayer -> self_attention(rotary_pos_emb=...) by keyword")


class _RecordingCoreAttention(torch.nn.Module):
    """A core attention with exactly the call signature tri_megatron's core attentions implement."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.seen = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self.seen = (query.detach().clone(), key.detach().clone())
        sq, b, h, d = query.shape
        return torch.zeros(sq, b, h * d, dtype=query.dtype)


def test_self_attention_rotates_only_given_frequencies(megatron_single_process):
    """rotary_pos_emb=None (what divert_rotary_pos_emb leaves) makes Attention.forward hand the core
    attention un-rotated q and k; given frequencies, it rotates both by them."""
    from megatron.core.models.common.embeddings import RotaryEmbedding, apply_rotary_pos_emb
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    cfg = _tiny_config(num_layers=1)
    spec = mcore_internals.set_attention_modules(get_gpt_layer_local_spec(), core_attention=_RecordingCoreAttention)
    try:
        attn = build_module(spec.submodules.self_attention, config=cfg, layer_number=1)
    except TypeError as e:  # megatron builds the core attention with other arguments
        pytest.fail(_seam(f"SelfAttention builds core_attention(config, layer_number, attn_mask_type, attention_type, "
                          f"attention_dropout, softmax_scale, cp_comm_type, pg_collection): {e}"))
    assert isinstance(attn.core_attention, _RecordingCoreAttention), _seam("GPT layer spec's core_attention slot")
    freqs = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0)(6)
    hidden = torch.randn(6, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))

    kwargs = {mcore_internals.ROPE_KWARG: freqs}
    try:
        attn(hidden, attention_mask=None, **kwargs)
        q_rope, k_rope = attn.core_attention.seen
        assert mcore_internals.divert_rotary_pos_emb(kwargs) is freqs and kwargs[mcore_internals.ROPE_KWARG] is None
        attn(hidden, attention_mask=None, **kwargs)
    except TypeError as e:  # megatron calls the core attention with other arguments
        pytest.fail(_seam(f"Attention.forward -> core_attention(q, k, v, mask, attn_mask_type=, attention_bias=, "
                          f"packed_seq_params=): {e}"))
    q, k = attn.core_attention.seen
    assert not torch.allclose(q, q_rope), _seam("Attention.forward rotates q when given rotary_pos_emb")
    torch.testing.assert_close(apply_rotary_pos_emb(q, freqs, cfg), q_rope,
                               msg=_seam("Attention.forward with rotary_pos_emb=None leaves q un-rotated"))
    torch.testing.assert_close(apply_rotary_pos_emb(k, freqs, cfg), k_rope,
                               msg=_seam("Attention.forward with rotary_pos_emb=None leaves k un-rotated"))
    assert mcore_internals.is_inference_call({"inference_params": object()})
    assert not mcore_internals.is_inference_call({"inference_context": None})


def test_attention_helpers_model_attention_uses():
    """megatron.core.transformer.utils helpers model/attention.py calls with these arguments."""
    from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint

    assert _params(is_layer_window_attention) == ["window_size", "window_attn_skip_freq", "layer_number"], \
        _seam("is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)")
    assert [is_layer_window_attention((4, 0), 4, n) for n in (1, 4, 5)] == [True, False, True], \
        _seam("is_layer_window_attention: every skip_freq-th layer (1-based) attends globally")
    assert _params(make_sharded_tensors_for_checkpoint)[:4] == \
        ["state_dict", "prefix", "tensor_parallel_layers_axis_map", "sharded_offsets"], \
        _seam("make_sharded_tensors_for_checkpoint(state_dict, prefix, tensor_parallel_layers_axis_map, sharded_offsets)")


# ============================================================== DDP's gradient buffer on each parameter
class _AccumulateIntoMainGrad(torch.autograd.Function):
    """y = x @ w.T whose weight gradient goes into w.main_grad, as tri_megatron's fused loss does."""

    @staticmethod
    def forward(ctx, x, w, alias):
        ctx.save_for_backward(x, w)
        ctx.alias = alias
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        mcore_internals.main_grad(w).add_((g.t() @ x).float())
        storage = mcore_internals.main_grad(w) if ctx.alias else None  # the placeholder in main_grad's memory
        return g @ w, mcore_internals.wgrad_placeholder(w, storage), None


def test_ddp_main_grad_contract(megatron_single_process):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = _tiny_config(num_layers=1)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(3, 4))  # accumulates into main_grad itself
    module.v = torch.nn.Parameter(torch.randn(3, 4))  # plain .grad, added by DDP's hook
    module.u = torch.nn.Parameter(torch.randn(3, 4))  # like w, its placeholder a view of its main_grad
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    w, v, u = module.w, module.v, module.u
    for p in (w, v, u):
        assert mcore_internals.in_ddp_grad_buffer(p), _seam("DDP sets param.main_grad and grad_added_to_main_grad")
        assert p.grad_added_to_main_grad is False, _seam("DDP starts with grad_added_to_main_grad = False")
        g = mcore_internals.main_grad(p)
        assert g.shape == p.shape and g.dtype == torch.float32, _seam("DDP main_grad: param-shaped, fp32")
    assert not mcore_internals.in_ddp_grad_buffer(torch.nn.Parameter(torch.zeros(2)))

    x = torch.randn(5, 4)
    ref_w = torch.randn(5, 3)
    for _ in range(2):  # two micro-batches accumulate
        (_AccumulateIntoMainGrad.apply(x, w, False) * ref_w).sum().backward()
        (x @ v.t() * ref_w).sum().backward()
        (_AccumulateIntoMainGrad.apply(x, u, True) * ref_w).sum().backward()
    want = 2 * (ref_w.t() @ x)
    torch.testing.assert_close(w.main_grad, want, msg=_seam("DDP's hook skips a grad already in main_grad"))
    torch.testing.assert_close(v.main_grad, want, msg=_seam("DDP's hook adds .grad into main_grad"))
    torch.testing.assert_close(u.main_grad, want, msg=_seam("DDP's hook neither reads nor writes a skipped grad"))
    assert w.grad is None and v.grad is None and u.grad is None, _seam("DDP's hook clears .grad")

    ddp.zero_grad_buffer()
    assert w.grad_added_to_main_grad is False, _seam("zero_grad_buffer resets grad_added_to_main_grad")
    assert not w.main_grad.any(), _seam("zero_grad_buffer zeroes main_grad")

    w.zero_out_wgrad = True  # megatron asks for zeros instead of an uninitialised placeholder
    w.main_grad.fill_(1.0)
    try:
        placeholder = mcore_internals.wgrad_placeholder(w)
        aliased = mcore_internals.wgrad_placeholder(w, storage=w.main_grad)  # zeros never made in main_grad
    finally:
        del w.zero_out_wgrad
    assert placeholder.shape == w.shape and not placeholder.any() and w.grad_added_to_main_grad is True
    assert not aliased.any() and bool((w.main_grad == 1).all())


# ===================================================================== DistributedOptimizer state loading
def test_distributed_optimizer_load_hooks():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    assert _params(DistributedOptimizer._set_main_param_and_optimizer_states) == ["self", "model_param", "tensors"], \
        _seam("DistributedOptimizer._set_main_param_and_optimizer_states(model_param, tensors)")
    src = inspect.getsource(DistributedOptimizer.load_parameter_state_from_fully_reshardable)
    assert "self._set_main_param_and_optimizer_states(" in src, \
        _seam("the fully-reshardable load copies states through self._set_main_param_and_optimizer_states")
    assert "init_state_fn" in inspect.signature(DistributedOptimizer.__init__).parameters and \
        "self.init_state_fn = init_state_fn" in inspect.getsource(MegatronOptimizer.__init__), \
        _seam("MegatronOptimizer.init_state_fn")


class _FakeOptimizer:
    """Stands for one megatron optimizer: its torch optimizer and the private per-param state setter."""

    def __init__(self):
        self.optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))])
        self.copied = []

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        self.copied.append(dict(tensors))

    def init_state_fn(self, opt, config=None):
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p].setdefault("exp_avg", torch.zeros_like(p))


def test_optimizer_step_passthrough_wraps_and_restores():
    opt = _FakeOptimizer()
    mcore_internals.prime_optimizer_state(opt)
    states = list(opt.optimizer.state.values())
    assert len(states) == 2 and all(float(s["step"]) == 0.0 and "exp_avg" in s for s in states)
    step = torch.tensor(7.0)
    for s in states:
        s["step"] = step  # what megatron's load does: one tensor for every param
    with mcore_internals.torch_adam_step_passthrough(opt):
        opt._set_main_param_and_optimizer_states(None, {"exp_avg": torch.ones(2)})
    assert float(opt.copied[0]["step"]) == 7.0
    assert "_set_main_param_and_optimizer_states" not in vars(opt)  # the class's method is back
    assert states[0]["step"] is not states[1]["step"]


# ================================================================ sharded state dicts of the model chunks
class _Chunk(torch.nn.Module):
    def sharded_state_dict(self, metadata=None):
        from megatron.core import parallel_state

        return {"vp": parallel_state.get_virtual_pipeline_model_parallel_rank(), "metadata": metadata}


def test_model_sharded_state_dicts_set_the_virtual_pipeline_rank(megatron_single_process):
    from megatron.core import parallel_state

    assert _params(parallel_state.set_virtual_pipeline_model_parallel_rank) == ["rank"], \
        _seam("parallel_state.set_virtual_pipeline_model_parallel_rank(rank)")
    before = parallel_state.get_virtual_pipeline_model_parallel_rank()
    dicts = mcore_internals.model_sharded_state_dicts([_Chunk(), _Chunk(), _Chunk()])
    assert [d["vp"] for d in dicts] == [0, 1, 2], _seam("virtual-pipeline rank set per chunk")
    assert parallel_state.get_virtual_pipeline_model_parallel_rank() == before
    assert "dp_cp_group" in dicts[0]["metadata"], _seam("ensure_metadata_has_dp_cp_group puts 'dp_cp_group'")
    assert len(mcore_internals.model_sharded_state_dicts([_Chunk()])) == 1


def test_async_sharded_save_round_trip(megatron_single_process, tmp_path):
    """What training/checkpointing.py's save relies on: the request's fields and methods, a replaceable
    async_fn, finalize functions run after the write, megatron's own writer on every release."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

    assert {"async_fn", "async_fn_args", "finalize_fns"} <= set(getattr(AsyncRequest, "_fields", ())), \
        _seam("AsyncRequest is a NamedTuple with async_fn, async_fn_args, finalize_fns")
    for name in ("add_finalize_fn", "execute_sync", "_replace"):
        assert hasattr(AsyncRequest, name), _seam(f"AsyncRequest.{name}")
    assert "persistent" in inspect.signature(AsyncCallsQueue.__init__).parameters and \
        hasattr(AsyncCallsQueue, "schedule_async_request") and hasattr(AsyncCallsQueue, "maybe_finalize_async_calls"), \
        _seam("AsyncCallsQueue(persistent=).schedule_async_request / maybe_finalize_async_calls")
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"w": ShardedTensor.from_rank_offsets("w", weight.clone(), replica_id=0)}
    try:
        request = mcore_internals.async_sharded_save(state, str(tmp_path))
    except ModuleNotFoundError as e:
        pytest.fail(_seam(f"asynchronous sharded save with megatron's own writer: {e}"))
    calls = []
    assert request.async_fn is not None, _seam("the asynchronous save leaves the shard writing to async_fn")
    inner = request.async_fn
    request = request._replace(async_fn=lambda *a, **k: (calls.append("write"), inner(*a, **k))[1])
    request.add_finalize_fn(lambda: calls.append("finalize"))
    request.execute_sync()
    assert calls == ["write", "finalize"], _seam("AsyncRequest: async_fn writes, then the finalize functions run")
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)},
                                     str(tmp_path))
    torch.testing.assert_close(loaded["w"], weight, msg=_seam("asynchronous sharded save round trip"))


def test_write_results_queue_is_ours(megatron_single_process, tmp_path, monkeypatch):
    """megatron's writer takes its write-results queue from filesystem_async's module global once that is
    set: own_write_results_queue (called by async_sharded_save) sets it to the queue of a manager it
    started (tests/test_fault.py's SIGKILL test checks that the manager dies with its trainer)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tri_megatron.mcore_internals import checkpoint

    getter = getattr(filesystem_async, "get_write_results_queue", None) or \
        getattr(filesystem_async, "_get_write_results_queue", None)
    assert getter is not None and hasattr(filesystem_async, "_results_queue"), \
        _seam("filesystem_async: _results_queue and its getter")
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a new process
    monkeypatch.setattr(checkpoint, "_RESULTS_MANAGER", None)
    seen, plan = [], filesystem_async.FileSystemWriterAsync.get_save_function_and_args

    def recording(writer):  # called once the write is prepared
        seen.append(getattr(writer, "results_queue", "missing"))
        return plan(writer)

    monkeypatch.setattr(filesystem_async.FileSystemWriterAsync, "get_save_function_and_args", recording)
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(2, 2), replica_id=0)}
    mcore_internals.async_sharded_save(state, str(tmp_path)).execute_sync()
    ours = filesystem_async._results_queue
    assert ours is not None and checkpoint._RESULTS_MANAGER is not None
    assert getter() is ours, _seam("the write-results queue getter returns the module global once set")
    assert seen and all(q is ours for q in seen), _seam("the writer sends its results through that queue")


def test_common_state_location():
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    assert mcore_internals.common_state_in_common_pt() == (RELEASE < (0, 19)), \
        _seam("distributed checkpoint common state: common.pt up to 0.18, a ShardedObject on 0.19")
    assert _params(CheckpointingConfig)[:2] == ["sharded_backend", "sharded_backend_version"], \
        _seam("CheckpointingConfig(sharded_backend, sharded_backend_version)")


def test_common_state_read_without_a_process_group(megatron_single_process, tmp_path):
    """convert/megatron_ckpt.py reads a Megatron-LM checkpoint's args in one process: from common.pt up to
    0.18, from the common_state object (under common_state_object_key) that 0.19 writes among the shards."""
    from argparse import Namespace

    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tri_megatron.convert.megatron_ckpt import read_common_state

    state = {"args": Namespace(num_layers=3, swiglu=True), "iteration": 7,
             "w": ShardedTensor.from_rank_offsets("w", torch.ones(2, 2), replica_id=0)}
    dist_checkpointing.save(state, str(tmp_path))
    stored = set(dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata)
    in_file = (tmp_path / "common.pt").is_file()
    assert in_file == mcore_internals.common_state_in_common_pt(), _seam("common.pt up to 0.18 only")
    assert (mcore_internals.common_state_object_key() in stored) == (not in_file), \
        _seam(f"0.19 stores the common state as {mcore_internals.common_state_object_key()!r}; stored: {sorted(stored)}")
    common = read_common_state(str(tmp_path))
    assert common["iteration"] == 7 and common["args"] == Namespace(num_layers=3, swiglu=True), common


def _cp_split_worker(rank, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # two CP groups of 2 in a world of 4
        tokens = torch.arange(32).view(2, 16)  # two sequences of 16 tokens, 4 chunks of 4 under CP=2
        out = mcore_internals.batch_on_this_cp_rank({"tokens": tokens, "labels": tokens + 100}, groups[rank // 2])
        keep = [0, 1, 2, 3, 12, 13, 14, 15] if rank % 2 == 0 else [4, 5, 6, 7, 8, 9, 10, 11]
        assert out["tokens"].tolist() == [keep, [16 + i for i in keep]], (rank, out["tokens"])
        assert torch.equal(out["labels"], out["tokens"] + 100)
    finally:
        dist.destroy_process_group()


def test_batch_on_this_cp_rank_on_a_real_group():
    """training/loop.py's context-parallel split: in a world of 4 with two CP=2 groups, CP rank r keeps
    sequence chunks r and 3-r of 4 (0.19 made is_hybrid_cp a required argument and reads the split from
    the group alone: the whole world, were the group not passed)."""
    import torch.multiprocessing as mp

    from tri_megatron.local_dist import free_port

    mp.spawn(_cp_split_worker, args=(free_port(),), nprocs=4, join=True)


# =========================================================================================== host stand-ins
def test_rng_tracker_hooks_are_module_functions(megatron_single_process):
    from megatron.core.tensor_parallel import random as mpu_random

    src = inspect.getsource(mpu_random.CudaRNGStatesTracker)
    for name in mcore_internals.RNG_TRACKER_HOOKS:
        assert hasattr(mpu_random, name), _seam(f"tensor_parallel.random.{name}")
        assert f"{name}(" in src, _seam(f"CudaRNGStatesTracker calls the module function {name}")
    assert mcore_internals._HOST_RNG_WARNING in inspect.getsource(mpu_random), \
        _seam("the RNG tracker's 'CPU RNG state changed' warning")
    # on this host (compat active) the tracker's generator is the host one
    torch.manual_seed(3)
    assert torch.equal(mpu_random._get_cuda_rng_state(), torch.get_rng_state())
    tracker = mpu_random.get_cuda_rng_tracker()
    state = torch.get_rng_state()
    with tracker.fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), state), _seam("the tracker's fork puts the host state back")
    assert not torch.equal(forked, torch.rand(4))


def test_gloo_group_getters(megatron_single_process):
    from megatron.core import parallel_state as ps
    from megatron.core import process_groups_config

    assert _params(ps.get_data_parallel_group_gloo) == ["with_context_parallel", "partial_data_parallel"], \
        _seam("parallel_state.get_data_parallel_group_gloo(with_context_parallel, partial_data_parallel)")
    assert _params(ps.get_expert_data_parallel_group_gloo) == ["partial_expert_data_parallel"], \
        _seam("parallel_state.get_expert_data_parallel_group_gloo(partial_expert_data_parallel)")
    assert "create_gloo_process_groups" in inspect.signature(ps.initialize_model_parallel).parameters
    src = inspect.getsource(process_groups_config)
    assert "parallel_state.get_data_parallel_group_gloo(" in src, \
        _seam("megatron reads the gloo groups through the parallel_state module")
    saved = ps.get_data_parallel_group_gloo
    with mcore_internals.gloo_groups_as_main():
        assert ps.get_data_parallel_group_gloo(with_context_parallel=True) is \
            ps.get_data_parallel_group(with_context_parallel=True)
    assert ps.get_data_parallel_group_gloo is saved


def test_vocab_parallel_cross_entropy_on_a_group(megatron_single_process, monkeypatch):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import cross_entropy as mce

    for name in ("get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
                 "get_tensor_model_parallel_world_size"):  # put back whatever the seam rebinds (0.16)
        if hasattr(mce, name):
            monkeypatch.setattr(mce, name, getattr(mce, name))
    if RELEASE >= (0, 19):
        assert "tp_group" in inspect.signature(mce.vocab_parallel_cross_entropy).parameters, \
            _seam("vocab_parallel_cross_entropy(tp_group=) on 0.19")
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(3, 2, 11, generator=g), torch.randint(0, 11, (3, 2), generator=g)
    loss = mcore_internals.vocab_parallel_cross_entropy_on(dist.new_group([0]))(logits.clone(), target)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), want, msg=_seam("vocab_parallel_cross_entropy on a given group"))


def test_megatron_rope_bshd():
    rope = mcore_internals.megatron_rope_bshd()
    assert _params(rope)[:2] == ["t", "freqs"], _seam("rope_utils._apply_rotary_pos_emb_bshd(t, freqs)")
    g = torch.Generator().manual_seed(2)
    t, freqs = torch.randn(5, 1, 2, 8, generator=g), torch.randn(5, 1, 1, 8, generator=g)
    x1, x2 = t.chunk(2, dim=-1)
    want = t * freqs.cos() + torch.cat((-x2, x1), dim=-1) * freqs.sin()  # rotate-half RoPE
    torch.testing.assert_close(rope(t, freqs), want, msg=_seam("_apply_rotary_pos_emb_bshd is rotate-half RoPE"))


class _RecordingNorm(torch.nn.RMSNorm):
    """A norm built as megatron builds norms, recording what it was built with."""
    built = []

    def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        _RecordingNorm.built.append((hidden_size, eps))


def test_norm_slots_of_layer_block_and_mtp_specs(megatron_single_process):
    """set_norm_modules / set_mtp_norm_modules / decoder_block_spec put our norm in every norm of a GPT model
    with MTP: 2 per decoder layer, the decoder's final norm, and per MTP layer enorm, hnorm, its transformer
    layer's 2 and its final norm; megatron's specs stay untouched and the decoder has its layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    cfg = _tiny_config(num_layers=3, mtp_num_layers=2, normalization="RMSNorm", layernorm_epsilon=1e-6)
    megatron_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    megatron_norm = megatron_spec.submodules.input_layernorm
    spec = mcore_internals.set_norm_modules(megatron_spec, _RecordingNorm)
    assert megatron_spec.submodules.input_layernorm is megatron_norm  # a copy: megatron's spec untouched
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False)
    ours_mtp = mcore_internals.set_mtp_norm_modules(mtp, _RecordingNorm)
    block = mcore_internals.decoder_block_spec(cfg, spec, _RecordingNorm)
    _RecordingNorm.built.clear()
    model = GPTModel(cfg, block, vocab_size=64, max_sequence_length=8, mtp_block_spec=ours_mtp)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))]
    want = 2 * 3 + 1 + 2 * (3 + 2)
    assert len(norms) == want and all(type(m) is _RecordingNorm for m in norms), \
        _seam(f"norm slots: {sorted({type(m).__name__ for m in norms})}, {len(norms)} norms (expected {want})")
    assert _RecordingNorm.built == [(32, 1e-6)] * want, _seam("norms built with (config, hidden_size, eps)")
    assert len(model.decoder.layers) == 3 and type(model.decoder.final_layernorm) is _RecordingNorm
    assert mtp.layer_specs[0].submodules.enorm is not _RecordingNorm  # a copy: megatron's MTP spec untouched


def test_set_attention_modules():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention

    spec = get_gpt_layer_local_spec()
    assert spec.submodules.self_attention.module is SelfAttention, _seam("GPT layer spec: self_attention.module")
    assert hasattr(spec.submodules.self_attention.submodules, "core_attention"), \
        _seam("GPT layer spec: self_attention.submodules.core_attention")
    ours = mcore_internals.set_attention_modules(spec, _RecordingCoreAttention, _RecordingCoreAttention)
    assert ours.submodules.self_attention.module is _RecordingCoreAttention
    assert ours.submodules.self_attention.submodules.core_attention is _RecordingCoreAttention
    assert spec.submodules.self_attention.module is SelfAttention  # a copy: megatron's spec untouched


# ===================================================================== used outside this module (pinned only)
def test_exhaustive_blending_indices():
    """data/datasets.py's exhaustive_blend calls megatron's compiled dataset helper directly: every sample
    of every dataset exactly once, each dataset's in order."""
    import numpy as np
    from megatron.core.datasets import helpers

    sizes = np.array([3, 1, 2], dtype=np.int64)
    di, dsi = np.zeros(6, dtype=np.int16), np.zeros(6, dtype=np.int64)
    try:
        helpers.build_exhaustive_blending_indices(di, dsi, sizes, len(sizes))
    except (AttributeError, TypeError) as e:
        pytest.fail(_seam(f"datasets.helpers.build_exhaustive_blending_indices(di, dsi, sizes, n): {e}"))
    for d, n in enumerate(sizes):
        assert dsi[di == d].tolist() == list(range(n)), _seam("exhaustive blending: each sample once, in order")
