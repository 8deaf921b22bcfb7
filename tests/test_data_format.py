"""Indexed-dataset format: megatron-core compatibility both ways, preprocessing errors, corrupt/missing files."""
import json
import os
import shutil

import numpy as np
import pytest

from test_data_common import (bin_dir, corpus_dir, data_args, load_script, tokenizer_dir,  # noqa: F401
                              unique_data, write_unique_dataset)


def _texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_preprocess_output_is_read_by_megatron_core(bin_dir, corpus_dir, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    for domain in ("ko", "code"):
        ds = IndexedDataset(os.path.join(bin_dir, f"{domain}_text_document"))
        texts = _texts(os.path.join(corpus_dir, f"{domain}.jsonl"))
        assert len(ds) == len(texts)
        assert ds.index.dtype == np.uint16  # vocab 700 < 65500, Megatron-LM's rule
        assert list(ds.document_indices) == list(range(len(texts) + 1))
        for i, text in enumerate(texts):
            expected = tok.encode(text, add_special_tokens=False).ids + [eod]
            assert ds[i].tolist() == expected
            assert tok.decode(ds[i][:-1].tolist()) == text


def test_workers_do_not_change_the_output(corpus_dir, tokenizer_dir, tmp_path):
    pre = load_script("tools/preprocess_data.py")
    src = os.path.join(corpus_dir, "ja.jsonl")
    for workers in (1, 2):
        assert pre.main(["--input", src, src, "--output-prefix", str(tmp_path / f"w{workers}"), "--tokenizer",
                         os.path.join(tokenizer_dir, "tokenizer.json"), "--workers", str(workers), "--append-eod",
                         "--quiet", "--chunk-lines", "7"]) == 0
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        b = (tmp_path / f"w2_text_document{ext}").read_bytes()
        assert a == b and len(a) > 0


def test_megatron_written_files_are_read_by_our_pipeline(tmp_path):
    """Files written with megatron-core's builder (as Megatron-LM's tool does) pass our checks and train."""
    from tri_megatron.data.indexed import check_indexed_dataset
    from tri_megatron.data.provider import build_data, validate_data_args

    prefix = str(tmp_path / "mlm_text_document")
    lengths = [7, 40, 3, 25, 60, 12, 33, 9, 50, 18] * 3
    docs = write_unique_dataset(prefix, lengths, first_token=100_000)  # > uint16: int32 file
    info = check_indexed_dataset(prefix)
    assert info.num_documents == len(lengths) and info.num_tokens == sum(lengths) and info.dtype == np.int32
    args = data_args([prefix], seq_length=16, micro_batch_size=1, split="100,0,0",
                     data_cache_path=str(tmp_path / "cache"))
    validate_data_args(args)
    total = sum(lengths)
    epoch = (total - 1) // 16
    bundle = build_data(args, dp_rank=0, dp_size=1, train_samples=epoch, eval_samples=0)
    last_of = {int(d[-1]) for d in docs}
    first_of = {int(d[0]) for d in docs}
    seen = []
    for batch in bundle.train_iterator(0):
        tokens, labels = batch["tokens"][0], batch["labels"][0]
        assert (tokens[1:] == labels[:-1]).all()
        window = tokens.tolist() + [int(labels[-1])]
        for a, b in zip(window, window[1:]):  # inside a document, or from a document's end to a start
            assert b == a + 1 or (a in last_of and b in first_of)
        seen += tokens.tolist()
    # one epoch: every sample cut from a different place, covering all but the tail of the stream
    assert len(seen) == len(set(seen)) == epoch * 16
    assert set(seen) <= set(np.concatenate(docs).tolist())


def _corrupt(src_prefix, dst_prefix, how):
    shutil.copy(src_prefix + ".bin", dst_prefix + ".bin")
    shutil.copy(src_prefix + ".idx", dst_prefix + ".idx")
    if how == "missing_bin":
        os.remove(dst_prefix + ".bin")
    elif how == "missing_idx":
        os.remove(dst_prefix + ".idx")
    elif how == "truncated_idx":
        data = open(dst_prefix + ".idx", "rb").read()
        open(dst_prefix + ".idx", "wb").write(data[:-9])
    elif how == "bad_header":
        data = bytearray(open(dst_prefix + ".idx", "rb").read())
        data[:4] = b"JUNK"
        open(dst_prefix + ".idx", "wb").write(bytes(data))
    elif how == "truncated_bin":
        data = open(dst_prefix + ".bin", "rb").read()
        open(dst_prefix + ".bin", "wb").write(data[: len(data) // 2])
    elif how == "empty_idx":
        open(dst_prefix + ".idx", "wb").close()
    elif how == "bad_pointers":
        data = bytearray(open(dst_prefix + ".idx", "rb").read())
        n_seq = int.from_bytes(data[18:26], "little")
        at = 34 + 4 * n_seq + 8  # the second sequence's byte offset
        data[at:at + 8] = (10**9).to_bytes(8, "little")
        open(dst_prefix + ".idx", "wb").write(bytes(data))


@pytest.mark.parametrize("how,needle", [
    ("missing_bin", ".bin not found"), ("missing_idx", ".idx not found"), ("truncated_idx", "truncated or corrupt"),
    ("bad_header", "bad magic header"), ("truncated_bin", "truncated or mismatched"), ("empty_idx", "truncated"),
    ("bad_pointers", "pointers do not match"),
])
def test_corrupt_or_missing_files_give_one_clear_error(bin_dir, tmp_path, how, needle):
    from tri_megatron.data.provider import validate_data_args

    good = os.path.join(bin_dir, "en_text_document")
    bad = str(tmp_path / "en_text_document")
    _corrupt(good, bad, how)
    with pytest.raises(ValueError) as err:
        validate_data_args(data_args([good, bad]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--data-path:") and needle in msg and "preprocess_data.py" in msg


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_malformed_lines_fail_cleanly_or_are_skipped(tokenizer_dir, tmp_path, capsys):
    pre = load_script("tools/preprocess_data.py")
    src = str(tmp_path / "in.jsonl")
    good = [json.dumps({"text": f"document number {i}"}) for i in range(6)]
    _write_lines(src, [good[0], good[1], "{not json", good[2], json.dumps({"body": "x"}), good[3],
                       json.dumps({"text": 5}), good[4], good[5]])
    out = str(tmp_path / "out")
    argv = ["--input", src, "--output-prefix", out, "--tokenizer", tokenizer_dir, "--append-eod", "--quiet"]
    assert pre.main(argv + ["--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{src}:3: malformed JSON" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing half-written, no temporary files

    assert pre.main(argv + ["--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert f"{src}:3: malformed JSON" in captured.err
    assert f"{src}:5: key 'text' missing" in captured.err
    assert f"{src}:7: key 'text' is int, not a string" in captured.err
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(out + "_text_document")) == 6


def test_failure_while_writing_leaves_nothing(tokenizer_dir, corpus_dir, tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    pre = load_script("tools/preprocess_data.py")

    def boom(self, idx_path):
        raise OSError("disk full")

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", boom)
    with pytest.raises(OSError):
        pre.main(["--input", os.path.join(corpus_dir, "en.jsonl"), "--output-prefix", str(tmp_path / "x"),
                  "--tokenizer", tokenizer_dir, "--quiet"])
    assert os.listdir(tmp_path) == []


def test_skip_existing(tokenizer_dir, corpus_dir, tmp_path, capsys):
    pre = load_script("tools/preprocess_data.py")
    argv = ["--input", os.path.join(corpus_dir, "math.jsonl"), "--output-prefix", str(tmp_path / "m"),
            "--tokenizer", tokenizer_dir, "--quiet", "--skip-existing"]
    assert pre.main(argv) == 0
    idx = tmp_path / "m_text_document.idx"
    stamp = idx.stat().st_mtime_ns
    assert pre.main(argv) == 0
    assert "skip:" in capsys.readouterr().out and idx.stat().st_mtime_ns == stamp
    idx.write_bytes(idx.read_bytes()[:20])  # corrupt: rebuilt, not skipped
    assert pre.main(argv) == 0
    from tri_megatron.data.indexed import check_indexed_dataset

    assert check_indexed_dataset(str(tmp_path / "m_text_document")).num_documents == 80


def test_gzip_input_and_several_json_keys(tokenizer_dir, tmp_path):
    import gzip

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    rows = [{"title": f"제목 {i}", "text": f"本文 {i} body text"} for i in range(30)]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    pre = load_script("tools/preprocess_data.py")
    out = str(tmp_path / "o")
    assert pre.main(["--input", str(src), "--output-prefix", out, "--tokenizer", tokenizer_dir, "--json-keys",
                     "text", "title", "--quiet"]) == 0
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    for key in ("text", "title"):
        ds = IndexedDataset(f"{out}_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(r[key], add_special_tokens=False).ids
                                                            for r in rows]  # no --append-eod: no EOD
