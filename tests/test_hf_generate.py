"""Cached generation of the exported Hugging Face model equals full recomputation, token for token.

The export's ``modeling_tri.py`` runs inside whatever transformers the user has, whose KV-cache API
changes between releases (5.24 renamed ``past_key_values`` to ``cache`` and moved sliding-window
cache semantics). For every feature combination (sliding windows, NoPE layers, SSMax, temperature
tuning, MTP kept or dropped) greedy ``generate`` with the cache must pick the same tokens, with the
same logits, as recomputing the whole sequence at every step — for generations longer than the window.
No megatron-core here: the model is built from its config with random weights.
"""

import pytest
import torch
import transformers

from tri_megatron.convert.hf_modeling.configuration_tri import TriConfig, TrillionConfig
from tri_megatron.convert.hf_modeling.modeling_tri import TriForCausalLM, TrillionForCausalLM

VERIFIED = "transformers 4.57.6 and 5.24.0"
WINDOW = 6
NEW_TOKENS = 3 * WINDOW  # well past the window
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
COMBOS = {
    "plain": dict(),
    "window+irope": dict(sliding_window=WINDOW, global_attention_freq=2),
    "ssmax+window+mtp": dict(sliding_window=WINDOW, global_attention_freq=2, ssmax=True, num_nextn_predict_layers=1),
    "ssmax+mtp-dropped": dict(ssmax=True, global_attention_freq=2),
    "tri70b-temperature": dict(sliding_window=WINDOW, global_attention_freq=2, attn_temperature_tuning=True,
                               floor_scale=4.0, attn_scale=0.5),
}


def _model(name, features):
    trillion = name.startswith("tri70b")
    cfg = (TrillionConfig if trillion else TriConfig)(**BASE, **features)
    torch.manual_seed(0)
    model = (TrillionForCausalLM if trillion else TriForCausalLM)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # large weights: well separated logits, no argmax near-ties
            p.normal_(0.0, 0.3)
        for layer in model.model.layers:
            if layer.self_attn.ssmax_scale is not None:
                layer.self_attn.ssmax_scale.uniform_(0.5, 1.5)
    return model


def _greedy_recompute(model, prompt, n):
    ids, logits = prompt, []
    with torch.no_grad():
        for _ in range(n):
            step = model(ids, use_cache=False).logits[:, -1].float()
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_cached_generate_equals_recomputation(name):
    model = _model(name, COMBOS[name])
    prompt = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    ref_ids, ref_logits = _greedy_recompute(model, prompt, NEW_TOKENS)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    got_logits = torch.stack(out.logits, 1).float()
    why = (f"cached generate differs from recomputation with transformers {transformers.__version__} "
           f"(verified equal with {VERIFIED}); its KV-cache API may have changed again")
    assert torch.equal(out.sequences, ref_ids), f"{why}:\n{out.sequences}\n{ref_ids}"
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-4, msg=lambda m: f"{why}: {m}")


def test_mtp_is_not_used_by_generation():
    """MTP kept or dropped: the main head's generation is the same model."""
    kept = _model("kept", COMBOS["ssmax+window+mtp"])
    dropped_cfg = dict(COMBOS["ssmax+window+mtp"], num_nextn_predict_layers=0)
    dropped = _model("dropped", dropped_cfg)
    dropped.load_state_dict({k: v for k, v in kept.state_dict().items() if not k.startswith("model.layers.4.")})
    prompt = torch.randint(0, BASE["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    a = kept.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    b = dropped.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(a, b)
    assert len(kept.mtp_logits(prompt)) == 1 and not dropped.mtp_logits(prompt)
