"""Pins the megatron-core internals that tri_megatron.mcore_internals relies on.

An upgrade of megatron-core that moves one of these fails here, naming the seam, rather than in a
long training run. Verified with megatron-core 0.16.1 (our lock) and 0.19.0 (NGC containers).
"""

import inspect

import megatron.core
import pytest
import torch

from tri_megatron import mcore_internals

VERIFIED = "megatron-core 0.16.1 and 0.19.0"


def _seam(name: str) -> str:
    return (f"megatron-core {megatron.core.__version__}: the seam '{name}' in tri_megatron/mcore_internals.py no "
            f"longer matches (verified with {VERIFIED})")


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


def test_mtp_tracker_round_trip(megatron_single_process):
    api = mcore_internals.mtp_tracker_api()
    assert api == ("metrics" if megatron.core.__version__ >= "0.19" else "loss"), _seam("MTP tracker API")
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
