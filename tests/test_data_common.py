"""Shared fixtures for the data-pipeline tests (no tests here): a tiny corpus, tokenizer and .bin/.idx files.

Everything is generated in a session temp dir: the sample corpus from examples/make_sample_corpus.py, a
byte-level BPE from tools/train_tokenizer.py, and indexed datasets either from tools/preprocess_data.py
or written directly with megatron-core's IndexedDatasetBuilder (what Megatron-LM's tool produces), where
every token id is unique so that tests can tell exactly which document positions a sample covers.
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
DOMAINS = ["en", "ko", "ja", "code", "math"]


def load_script(relpath: str):
    """Imports a script under tools/ or examples/ as a module."""
    path = os.path.join(ROOT, relpath)
    name = "tri_script_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def small_tokenizer(base) -> str:
    """A 600-token tokenizer trained on a 20-document sample corpus (en, ko, code) under ``base``; its path."""
    corpus, tok = str(base / "corpus"), str(base / "tok")
    load_script("examples/make_sample_corpus.py").main(["--output", corpus, "--docs-per-domain", "20"])
    assert load_script("tools/train_tokenizer.py").main(
        ["--input", *[os.path.join(corpus, f"{d}.jsonl") for d in ("en", "ko", "code")], "--vocab-size", "600",
         "--output", tok]) == 0
    return tok


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    load_script("examples/make_sample_corpus.py").main(["--output", str(out), "--docs-per-domain", "80"])
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    inputs = [os.path.join(corpus_dir, f"{d}.jsonl") for d in DOMAINS]
    rc = load_script("tools/train_tokenizer.py").main(
        ["--input", *inputs, "--vocab-size", "700", "--quota", "ko=0.15,ja=0.15,rest=0.70", "--output", str(out),
         "--heldout-docs", "10"])
    assert rc == 0
    return str(out)


@pytest.fixture(scope="session")
def bin_dir(corpus_dir, tokenizer_dir, tmp_path_factory):
    """tools/preprocess_data.py output for every domain: <dir>/<domain>_text_document."""
    out = tmp_path_factory.mktemp("bin")
    inputs = [os.path.join(corpus_dir, f"{d}.jsonl") for d in DOMAINS]
    rc = load_script("tools/preprocess_data.py").main(
        ["--input", *inputs, "--output-prefix", str(out) + "/", "--output-per-input", "--tokenizer", tokenizer_dir,
         "--append-eod", "--quiet"])
    assert rc == 0
    return str(out)


def write_unique_dataset(prefix: str, doc_lengths, first_token: int, dtype=np.int32):
    """A dataset written the way Megatron-LM's preprocess_data.py writes it, every token id distinct.

    Document d holds first_token + offset_d + arange(len_d). Returns the list of documents.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs, nxt = [], first_token
    for length in doc_lengths:
        doc = np.arange(nxt, nxt + length, dtype=np.int64)
        nxt += length
        builder.add_document(doc, [length])
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


def data_args(data_path, seq_length=32, micro_batch_size=2, seed=1234, **extra):
    from tri_megatron.data.provider import add_data_args

    parser = argparse.ArgumentParser()
    add_data_args(parser)
    argv = ["--data-path", *data_path]
    for k, v in extra.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    args = parser.parse_args(argv)
    args.seq_length, args.micro_batch_size, args.seed = seq_length, micro_batch_size, seed
    return args


def write_schedule(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="session")
def unique_data(tmp_path_factory):
    """Three domains of unique-token documents (varied lengths), as Megatron-LM would write them."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    prefixes, docs = {}, {}
    start = 10
    for name, n_docs in (("alpha", 400), ("beta", 300), ("gamma", 200)):
        lengths = rng.integers(5, 60, size=n_docs)
        prefix = os.path.join(str(root), f"{name}_text_document")
        docs[name] = write_unique_dataset(prefix, lengths, start)
        start += int(lengths.sum()) + 1000
        prefixes[name] = prefix
    return {"root": str(root), "prefixes": prefixes, "docs": docs}
