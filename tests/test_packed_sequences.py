"""Packed samples (--reset-position-ids --reset-attention-mask --eod-mask-loss): a packed sample trains
exactly as its documents one by one.

* data: positions / loss mask / boundaries agree with megatron-core's GPTDataset; the flags leave the
  sample order, the mixture and resume untouched; mock data packs EOD-ended documents.
* local attention (thd, blocked, never an [t, t] mask) = attention of each document alone, with and
  without a sliding window, values and gradients.
* model: loss and gradients of a packed micro-batch = the sum over its documents run one by one (fp32,
  1e-5) for the plain model, SSMax + iRoPE, and iRoPE + window + temperature tuning.
* TP2 / PP2: a packed run's loss and gradient norm equal the single-process packed run's (mock data
  whose micro-batches differ in their number of documents).
* HF export: position ids that restart inside a row = the documents run one by one.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from test_data_common import bin_dir, corpus_dir, data_args, tokenizer_dir  # noqa: F401

# ----------------------------------------------------------------------------------------- data --------
EOD = 7


def _tokens_with_eods():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(8, 50, (3, 24), generator=g)
    t[0, [4, 5, 17]] = EOD  # an empty document between two EODs, one ending at the last token
    t[1, 23] = EOD
    t[2, [0, 10]] = EOD
    return t


def test_positions_and_loss_mask_match_megatron_core_gpt_dataset():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from tri_megatron.data import packing

    tokens = _tokens_with_eods()
    for row in tokens:
        mask, loss_mask, pos = _get_ltor_masks_and_position_ids(row, EOD, True, True, True, True)
        assert torch.equal(packing.reset_position_ids(row, EOD), pos)
        assert torch.equal(packing.eod_loss_mask(row, EOD), loss_mask)
        # megatron's dense mask (True = masked) is exactly "other document or future"
        starts = packing.document_starts(row, EOD)
        doc = torch.cumsum(starts.long(), 0)
        allowed = (doc[:, None] == doc[None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
        assert torch.equal(~mask[0], allowed)


def test_boundaries_cover_the_micro_batch_sample_after_sample():
    from tri_megatron.data import packing

    tokens = _tokens_with_eods()
    cu, max_seqlen = packing.document_boundaries(tokens, EOD)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 5, 6, 18, 24, 48, 49, 59, 72]
    assert max_seqlen == 24
    pos = packing.reset_position_ids(tokens, EOD).reshape(-1)
    from tri_megatron.ops.rope_ssmax import document_positions

    assert torch.equal(document_positions(cu), pos)  # the model's view of positions = the data's


def test_flag_validation_is_one_line_per_flag():
    from tri_megatron.data.config import DataConfig

    with pytest.raises(ValueError, match="^--reset-attention-mask: .*add --reset-position-ids$"):
        DataConfig(mock_data=True, reset_attention_mask=True).validate()
    with pytest.raises(ValueError, match="^--reset-position-ids: .*add --reset-attention-mask"):
        DataConfig(mock_data=True, reset_position_ids=True).validate()
    with pytest.raises(ValueError, match="--context-parallel-size"):
        DataConfig(mock_data=True, reset_attention_mask=True, reset_position_ids=True).validate(
            context_parallel_size=2)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        DataConfig(data_path=["x"], reset_attention_mask=True, reset_position_ids=True).validate()
    DataConfig(mock_data=True, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True).validate()


def test_mock_data_packs_eod_documents_when_asked():
    from tri_megatron.data import packing
    from tri_megatron.data.config import DataConfig
    from tri_megatron.training.mock_data import MockData, micro_batch

    vocab = 101
    plain = micro_batch([0, 1], 64, vocab, 3)
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    cfg = DataConfig(mock_data=True, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    data = MockData(64, vocab, 2, 0, 1, seed=3, config=cfg)
    assert data.eod_id == vocab - 1
    counts = set()
    for _, b in zip(range(8), data.train_iterator(0)):
        tokens = b["tokens"]
        assert torch.equal(b["labels"][:, :-1], tokens[:, 1:])
        assert torch.equal(b["position_ids"], packing.reset_position_ids(tokens, vocab - 1))
        assert torch.equal(b["loss_mask"], (tokens != vocab - 1).float())
        cu, m = packing.document_boundaries(tokens, vocab - 1)
        assert torch.equal(b["cu_seqlens"], cu) and b["max_seqlen"] == m
        counts.add(len(cu) - 1)
    assert len(counts) > 1  # micro-batches differ in their number of documents
    # resume: the iterator from consumed_samples k gives the same micro-batches as the full run
    full = [b for _, b in zip(range(6), data.train_iterator(0))]
    tail = [b for _, b in zip(range(4), data.train_iterator(4))]
    for a, b in zip(full[2:], tail):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_file_data_flags_keep_samples_mixture_and_resume(bin_dir, tokenizer_dir, tmp_path):
    from tri_megatron.data import packing
    from tri_megatron.data.provider import build_data

    prefixes = [os.path.join(bin_dir, f"{d}_text_document") for d in ("en", "ko")]

    def bundle(**flags):
        args = data_args(prefixes, seq_length=128, micro_batch_size=2, tokenizer=tokenizer_dir,
                         data_cache_path=str(tmp_path / "cache"), **flags)
        return build_data(args, dp_rank=0, dp_size=1, train_samples=24, eval_samples=0)

    plain = bundle()
    packed = bundle(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    assert packed.fingerprint == plain.fingerprint
    a, b = list(plain.train_iterator(0)), list(packed.train_iterator(0))
    assert len(a) == len(b) == 12
    eod = packed.eod_id
    multi = 0
    for x, y in zip(a, b):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["domain"], y["domain"])  # the mixture: same domain per sample
        assert "cu_seqlens" not in x
        assert torch.equal(y["position_ids"], packing.reset_position_ids(y["tokens"], eod))
        assert torch.equal(y["loss_mask"], (y["tokens"] != eod).float())
        cu, m = packing.document_boundaries(y["tokens"], eod)
        assert torch.equal(y["cu_seqlens"], cu) and y["max_seqlen"] == m
        multi += len(cu) > 3
    assert multi  # the corpus really packs several documents into samples
    resumed = list(bundle(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True).train_iterator(10))
    for y, r in zip(b[5:], resumed):
        assert torch.equal(y["cu_seqlens"], r["cu_seqlens"]) and torch.equal(y["position_ids"], r["position_ids"])


# ------------------------------------------------------------------------------- local attention ------
def _core_attention(window=None):
    from megatron.core.transformer.enums import AttnMaskType

    from tri_megatron.model.attention import SDPACoreAttention
    from tri_megatron.model.config import TriTransformerConfig

    cfg = TriTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               kv_channels=16, window_size=window, window_attn_skip_freq=None,
                               attention_dropout=0.0)
    return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _naive(q, k, v, window=None):
    """q [s, h, d], k, v [s, g, d]: causal (window: W-1 keys back) attention of one document."""
    s, h, d = q.shape
    rep = h // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("shd,thd->hst", q, kr) / math.sqrt(d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j >= i - window[0])
    return torch.einsum("hst,thd->shd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vr)


@pytest.mark.parametrize("window", [None, (4, 0)], ids=["causal", "window5"])
def test_local_packed_attention_equals_each_document_alone(megatron_single_process, window):
    from tri_megatron.data.packing import packed_seq_params

    attn = _core_attention(window)
    attn.window_block = 4  # several blocks, blocks straddling documents
    lengths = [3, 9, 1, 6, 11]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(t, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(t, 2, 16, generator=g, requires_grad=True)
    out = attn(q, k, v, None, packed_seq_params=packed_seq_params(cu, max(lengths)))
    assert out.shape == (t, 64)
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    pieces = [_naive(q[a:b], k[a:b], v[a:b], window).reshape(b - a, 64) for a, b in zip(cu[:-1], cu[1:])]
    ref = torch.cat(pieces)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- model ------
PACKED = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
MODEL_FEATURES = {
    "plain": [],
    "ssmax_irope": ["--ssmax", "--no-rope-freq", "4"],
    "irope_window_temperature": ["--no-rope-freq", "4", "--window-size", "6", "--window-attn-skip-freq", "4",
                                 "--attn-temperature-tuning", "--attn-floor-scale", "4", "--attn-scale", "0.5"],
}


def _build(features, seq_length=32):
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_model_chunks
    from tri_megatron.model.config import transformer_config

    cfg = load_run_config(["--mock-data", "--seq-length", str(seq_length), *PACKED, *features], world_size=1,
                          rank=0, check_disk=False)
    torch.manual_seed(0)
    return build_model_chunks(transformer_config(cfg, False), cfg, False)[0], cfg.arch.vocab_size


@pytest.mark.parametrize("name", sorted(MODEL_FEATURES))
def test_packed_sample_equals_its_documents_one_by_one(megatron_single_process, name):
    from tri_megatron.data import packing

    model, vocab_size = _build(MODEL_FEATURES[name])
    eod, s = vocab_size - 1, 32
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, eod, (2, s), generator=g)
    tokens[0, [9, 20]] = eod  # documents of 10, 11, 11 tokens; then 7 and 25 (longer than the window)
    tokens[1, 6] = eod
    labels = torch.randint(0, eod, (2, s), generator=g)
    batch = packing.add_boundaries({"tokens": tokens, "labels": labels,
                                    "loss_mask": packing.eod_loss_mask(tokens, eod),
                                    "position_ids": packing.reset_position_ids(tokens, eod)}, eod)
    cu, max_seqlen = batch.pop("cu_seqlens"), batch.pop("max_seqlen")
    assert cu.tolist() == [0, 10, 21, 32, 39, 64] and max_seqlen == 25
    thd = packing.to_thd(batch)

    model.zero_grad()
    per_token = model(thd["tokens"], thd["position_ids"], None, labels=thd["labels"],
                      packed_seq_params=packing.packed_seq_params(cu, max_seqlen))
    packed_loss = (per_token.float().reshape(-1) * thd["loss_mask"].reshape(-1)).sum()
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    flat = {k: thd[k].reshape(-1) for k in ("tokens", "labels", "loss_mask")}
    doc_loss = 0.0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a
        out = model(flat["tokens"][None, a:b], torch.arange(n)[None], None, labels=flat["labels"][None, a:b])
        loss = (out.float().reshape(-1) * flat["loss_mask"][a:b]).sum()
        loss.backward()
        doc_loss = doc_loss + loss.detach()
    torch.testing.assert_close(packed_loss.detach(), doc_loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


# ----------------------------------------------------------------------------------- TP2 / PP2 --------
# Two feature sets cover the paths (the plain model's is the RoPE layers of the second: megatron-core's
# own thd RoPE); each under TP2 (with and without sequence parallelism) and PP2.
DIST_FEATURES = {"ssmax_irope_window": ["--ssmax", "--no-rope-freq", "4", "--window-size", "6",
                                        "--window-attn-skip-freq", "4"],
                 "irope_window_temperature": MODEL_FEATURES["irope_window_temperature"]}
DIST_CASES = [(n, layout) for n in DIST_FEATURES for layout in ("tp2", "tp2_sp", "pp2")]
DIST_LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"],
                "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                "pp2": ["--pipeline-model-parallel-size", "2"]}


@pytest.fixture(scope="module")
def packed_references(tmp_path_factory):
    from launcher import TINY, train

    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            flags = [*TINY, *PACKED, *DIST_FEATURES[name]]
            init = str(root / "init")
            train(1, [*flags, "--train-iters", "0", "--save", init, "--no-save-optim"], str(root / "init.jsonl"))
            cache[name] = (flags, init, root, train(1, [*flags, "--train-iters", "2", "--load", init],
                                                    str(root / "ref.jsonl")))
        return cache[name]

    return get


@pytest.mark.parametrize("name,layout", DIST_CASES, ids=[f"{n}-{l}" for n, l in DIST_CASES])
def test_packed_training_under_tp2_pp2_matches_single_process(packed_references, name, layout):
    from launcher import train

    flags, init, root, ref = packed_references(name)
    got = train(2, [*flags, *DIST_LAYOUTS[layout], "--train-iters", "2", "--load", init],
                str(root / f"{layout}.jsonl"))
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got):
        assert abs(r["lm_loss"] - g["lm_loss"]) <= 1e-5, (r, g)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4, abs=1e-6)


# -------------------------------------------------------------------------------------- HF export -----
@pytest.mark.parametrize("features", [dict(ssmax=True, global_attention_freq=2, sliding_window=4),
                                      dict(attn_temperature_tuning=True, global_attention_freq=2,
                                           sliding_window=4, floor_scale=2.0, attn_scale=0.5)],
                         ids=["ssmax_window", "temperature_window"])
def test_hf_export_restarts_documents_where_position_ids_restart(features):
    from tri_megatron.convert.hf_modeling.configuration_tri import TriConfig, TrillionConfig
    from tri_megatron.convert.hf_modeling.modeling_tri import TriForCausalLM, TrillionForCausalLM

    trillion = "attn_temperature_tuning" in features
    cfg = (TrillionConfig if trillion else TriConfig)(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **features)
    torch.manual_seed(0)
    model = (TrillionForCausalLM if trillion else TriForCausalLM)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    lengths = [5, 9, 3]
    ids = torch.randint(0, 61, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        a = 0
        for n in lengths:
            alone = model(ids[:, a:a + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, a:a + n], alone, atol=1e-5, rtol=1e-5)
            a += n


def test_packed_flags_are_checked_before_start():
    """The run configuration refuses, one line naming the flag, what packed sequences cannot do yet."""
    from tri_megatron.config import ArgumentError, load_run_config

    base = ["--model", "tri-tiny", "--mock-data", "--seq-length", "64"]
    with pytest.raises(ArgumentError, match="^--reset-attention-mask: .*--context-parallel-size"):
        load_run_config([*base, *PACKED, "--context-parallel-size", "2"], world_size=2, rank=0, check_disk=False)
    with pytest.raises(ArgumentError, match="^--reset-position-ids: "):
        load_run_config([*base, "--reset-position-ids"], world_size=1, rank=0, check_disk=False)
    cfg = load_run_config([*base, *PACKED], world_size=1, rank=0, check_disk=False)
    assert cfg.data.packed and cfg.data.eod_mask_loss


def test_bench_packed_attention_runs_and_agrees(tmp_path):
    """tools/bench_packed_attention.py at a tiny size: its JSON has both ways per case and the blocked
    path's output and gradients equal the dense-mask SDPA's (no timing judged here)."""
    import json
    import subprocess
    import sys

    from launcher import ROOT

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_packed_attention.py"), "--seq", "192",
                           "--window", "40", "--docs", "3", "--block", "32", "--reps", "1", "--cases",
                           "packed+window", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r["case"], r["way"]) for r in data["rows"]] == [("packed+window", "dense"), ("packed+window", "blocked")]
    assert all(r["peak_extra_bytes"] >= 0 and r["time_s"] > 0 for r in data["rows"])
    assert data["rows"][0]["max_abs_diff_vs_dense"] < 1e-5
    assert "| packed+window | blocked |" in proc.stdout
