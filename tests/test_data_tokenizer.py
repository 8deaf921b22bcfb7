"""tools/train_tokenizer.py: quotas, Hugging Face compatibility, fertility report, balanced sampling."""
import json
import os

import pytest

from test_data_common import DOMAINS, corpus_dir, load_script, tokenizer_dir  # noqa: F401


def _report(path):
    with open(os.path.join(path, "train_report.json"), encoding="utf-8") as f:
        return json.load(f)


def test_tokenizer_loads_in_transformers_and_round_trips(tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    import tokenizers
    import transformers

    why = (f"with transformers {transformers.__version__} / tokenizers {tokenizers.__version__} (verified with "
           f"transformers 5.24.0 / tokenizers 0.23.3 and transformers 4.57.6 / tokenizers 0.22.2)")
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tokenizer_dir)  # local directory: no download
    assert len(fast) == len(auto) == 700, why
    assert auto.eos_token == "<|endoftext|>" and auto.pad_token == "<|pad|>", why
    for text in ["학생은 도서관에서 책을 읽었습니다.", "猫は公園で写真を撮りました。", "def f(x):\n    return x * 2\n",
                 "Solve 3x + 7 = 22. Answer: x = 5", "emoji 🙂 and unseen 中文 text ÿ"]:
        ids = fast.encode(text)
        assert auto.encode(text) == ids, why
        assert fast.decode(ids) == text, why  # byte-level: lossless on any text


def test_quota_shares_are_met_and_fertility_is_reported(tokenizer_dir):
    report = _report(tokenizer_dir)
    assert report["realised_vocab_size"] == 700
    for group, target in (("ko", 0.15), ("ja", 0.15), ("rest", 0.70)):
        assert abs(report["quota"][group]["realised"] - target) < 0.01, report["quota"]
    fert = report["fertility"]["trained"]
    assert set(fert) == set(DOMAINS)  # labels from the JSON `lang` field
    for label, f in fert.items():
        assert f["docs"] == 10 and f["tokens"] > 0
        assert 0 < f["tokens_per_char"] <= 4 and f["tokens_per_byte"] <= 1.0
    assert fert["ja"]["tokens_per_word"] is None  # no spaces between Japanese words
    assert fert["en"]["tokens_per_word"] >= 1.0 and fert["ko"]["tokens_per_word"] >= 1.0


def test_korean_quota_improves_korean_fertility(corpus_dir, tokenizer_dir, tmp_path):
    """The same vocabulary size with no Korean quota tokenizes Korean into more pieces."""
    train = load_script("tools/train_tokenizer.py")
    inputs = [os.path.join(corpus_dir, f"{d}.jsonl") for d in DOMAINS]
    out = str(tmp_path / "no_ko")
    assert train.main(["--input", *inputs, "--vocab-size", "700", "--quota", "ko=0.0,ja=0.15,rest=0.85",
                       "--output", out, "--heldout-docs", "10", "--compare", tokenizer_dir]) == 0
    fert = _report(out)["fertility"]
    with_quota = fert[os.path.basename(tokenizer_dir)]["ko"]["tokens_per_char"]
    without = fert["trained"]["ko"]["tokens_per_char"]
    assert with_quota < 0.8 * without
    # held-out text is the same for both tokenizers, so the comparison is fair
    assert fert[os.path.basename(tokenizer_dir)]["ko"]["docs"] == fert["trained"]["ko"]["docs"]


def test_balanced_sampling_and_labels_from_file_or_script(corpus_dir, tmp_path):
    train = load_script("tools/train_tokenizer.py")
    # NAME=FILE labels a whole file; unlabeled text is labeled by script (ko.txt has no JSON `lang`)
    txt = tmp_path / "ko.txt"
    with open(os.path.join(corpus_dir, "ko.jsonl"), encoding="utf-8") as f:
        txt.write_text("\n".join(json.loads(line)["text"].replace("\n", " ") for line in f), encoding="utf-8")
    out = str(tmp_path / "tok")
    assert train.main(["--input", f"english={os.path.join(corpus_dir, 'en.jsonl')}", str(txt),
                       "--vocab-size", "400", "--output", out, "--docs-per-language", "30",
                       "--heldout-docs", "5"]) == 0
    docs = _report(out)["documents"]
    assert set(docs) == {"english", "ko"}
    for label in docs:
        assert docs[label]["seen"] == 80
        assert docs[label]["train"] + docs[label]["heldout"] == 35  # at most --docs-per-language + held out


def test_bad_quota_is_rejected(corpus_dir, tmp_path):
    train = load_script("tools/train_tokenizer.py")
    with pytest.raises(SystemExit, match="sum to 0.9"):
        train.main(["--input", os.path.join(corpus_dir, "en.jsonl"), "--vocab-size", "400", "--quota",
                    "ko=0.2,rest=0.7", "--output", str(tmp_path / "t")])
