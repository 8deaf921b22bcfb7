#!/usr/bin/env python
"""JSONL -> megatron-core indexed dataset (.bin/.idx), the format of Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input data/sample/ko.jsonl --output-prefix data/ko \
        --tokenizer out/tokenizer --json-keys text --workers 2 --append-eod
    # -> data/ko_text_document.bin / .idx   (use "data/ko_text_document" in --data-path)

Flags follow Megatron-LM where they exist (--input, --output-prefix, --json-keys, --workers, --append-eod;
--tokenizer-model is an alias of --tokenizer). Several --input files are concatenated into one output in
order. Workers tokenize chunks of lines with the Rust `encode_batch` (single-threaded per process: tokens/s
scale with --workers) and the main process appends them with megatron-core's IndexedDatasetBuilder, so
documents keep input order. Malformed lines are reported as FILE:LINE; --on-error fail (default) stops
at the first one, --on-error skip reports each and continues. Outputs are written under temporary names
and renamed at the end: a failed or interrupted run leaves nothing half-written. --skip-existing leaves
valid existing outputs alone. Each output gets <name>.tokenizer.json beside its .bin/.idx: the
tokenizer's vocabulary size, content hash and EOD id, which pretrain_tri.py checks against the model. --output-per-input makes one output per input file in a single run
(one start-up: importing megatron-core takes seconds).
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import List, Optional, Tuple

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import numpy as np  # noqa: E402

from tri_megatron.data.corpus import open_text  # noqa: E402

_STATE = {}


class MalformedLine(Exception):
    pass


def _init_worker(tokenizer_path: str, json_keys: List[str], append_eod: bool, dtype_name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles interrupts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must be able to stop us
    from tri_megatron.data.tokenizer import TriTokenizer

    tok = TriTokenizer(tokenizer_path)
    _STATE.update(tok=tok, keys=json_keys, eod=tok.eod if append_eod else None, dtype=np.dtype(dtype_name))


def encode_chunk(chunk: Tuple[str, int, List[str]]):
    """(file, first line number, lines) -> per key (tokens, lengths), errors, documents, bytes."""
    path, first_line, lines = chunk
    keys, tok, eod, dtype = _STATE["keys"], _STATE["tok"], _STATE["eod"], _STATE["dtype"]
    texts = {k: [] for k in keys}
    errors, docs, nbytes = [], 0, 0
    for offset, line in enumerate(lines):
        nbytes += len(line) if line.isascii() else len(line.encode("utf-8"))
        if not line.strip():
            continue
        where = f"{path}:{first_line + offset}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        row = {}
        for k in keys:
            v = obj.get(k)
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                v = "".join(v)  # Megatron-LM accepts a list of sentences; we keep one sequence per document
            if not isinstance(v, str):
                row = None
                errors.append(f"{where}: key '{k}' " + ("missing" if k not in obj else
                                                       f"is {type(v).__name__}, not a string"))
                break
            row[k] = v
        if row is None:
            continue
        docs += 1
        for k in keys:
            if row[k]:
                texts[k].append(row[k])
    out = {}
    for k in keys:
        ids = tok.encode_batch(texts[k]) if texts[k] else []
        ids = [x for x in ids if x]  # documents without tokens are dropped, as Megatron-LM does
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        if eod is not None:
            lengths += 1
            flat = itertools.chain.from_iterable(itertools.chain.from_iterable(zip(ids, itertools.repeat((eod,)))))
        else:
            flat = itertools.chain.from_iterable(ids)
        out[k] = (np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths)
    return out, errors, docs, nbytes


def read_chunks(files: List[str], chunk_lines: int, chunk_bytes: int):
    for path in files:
        with open_text(path) as f:
            lines, size, first = [], 0, 1
            for line_no, line in enumerate(f, start=1):
                if not lines:
                    first = line_no
                lines.append(line)
                size += len(line)
                if len(lines) >= chunk_lines or size >= chunk_bytes:
                    yield path, first, lines
                    lines, size = [], 0
            if lines:
                yield path, first, lines


def output_paths(prefix: str, key: str) -> Tuple[str, str]:
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"


def input_stem(path: str) -> str:
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".gz") else name
    return os.path.splitext(name)[0]


def plan_jobs(args) -> List[Tuple[List[str], str]]:
    """(input files, output prefix) per output; --output-per-input gives each input its own prefix."""
    if not args.output_per_input:
        return [(list(args.input), args.output_prefix)]
    stems = [input_stem(p) for p in args.input]
    if len(set(stems)) != len(stems):
        raise ValueError("--output-per-input: two inputs have the same file name stem; rename one")
    return [([p], args.output_prefix + stem) for p, stem in zip(args.input, stems)]


class _Stats:
    docs = tokens = errors = 0


def process(inputs: List[str], prefix: str, keys: List[str], dtype, encode, args, stats: _Stats,
            identity: dict) -> None:
    """Tokenizes `inputs` into <prefix>_<key>_document.bin/.idx (temporary names until it succeeds) and
    records the tokenizer's identity beside them (<prefix>_<key>_document.tokenizer.json)."""
    from tqdm import tqdm

    from tri_megatron.data.indexed import make_builder
    from tri_megatron.data.tokenizer_identity import write_identity

    finals = {k: output_paths(prefix, k) for k in keys}
    tmps = {k: tuple(f"{p}.tmp.{os.getpid()}" for p in finals[k]) for k in keys}
    builders = {}
    ok = False
    t0 = time.time()
    try:
        for k in keys:
            builders[k] = make_builder(tmps[k][0], dtype)
        gz = any(p.endswith(".gz") for p in inputs)  # progress counts text bytes: unknown total for .gz
        total_bytes = None if gz else sum(os.path.getsize(p) for p in inputs)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=os.path.basename(prefix), disable=args.quiet,
                   mininterval=1.0, dynamic_ncols=True)
        tokens_here = docs_here = 0
        for out, errors, docs, nbytes in encode(read_chunks(inputs, args.chunk_lines, args.chunk_bytes)):
            for e in errors:
                stats.errors += 1
                if args.on_error == "fail":
                    raise MalformedLine(e)
                if stats.errors <= args.max_error_reports:
                    bar.write(f"skipped {e}", file=sys.stderr)
            for k in keys:
                tokens, lengths = out[k]
                builders[k].add_documents(tokens, lengths)
                tokens_here += int(tokens.size)
            stats.docs += docs
            docs_here += docs
            bar.update(nbytes)
            bar.set_postfix_str(f"docs={docs_here} tok/s={tokens_here / max(time.time() - t0, 1e-9):,.0f}",
                                refresh=False)
        bar.close()
        stats.tokens += tokens_here
        for k in keys:
            builders[k].finalize(tmps[k][1])
        for k in keys:
            os.replace(tmps[k][0], finals[k][0])
            os.replace(tmps[k][1], finals[k][1])
            write_identity(finals[k][0][:-len(".bin")], identity)
        ok = True
    finally:
        if not ok:
            for k in keys:
                if k in builders and not builders[k].data_file.closed:
                    builders[k].data_file.close()
                for p in tmps[k]:
                    if os.path.exists(p):
                        os.remove(p)
    for k in keys:
        print(f"wrote {finals[k][0]} and {finals[k][1]}")


def run(args) -> int:
    from tri_megatron.data.indexed import check_indexed_dataset, optimal_dtype
    from tri_megatron.data.tokenizer import TriTokenizer
    from tri_megatron.data.tokenizer_identity import tokenizer_identity

    for path in args.input:
        if not os.path.isfile(path):
            print(f"error: --input {path}: file not found", file=sys.stderr)
            return 2
    try:
        tok = TriTokenizer(args.tokenizer)
        jobs = plan_jobs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = args.json_keys
    if args.skip_existing:
        todo = []
        for inputs, prefix in jobs:
            try:
                for k in keys:
                    check_indexed_dataset(f"{prefix}_{k}_document", "--output-prefix")
                print(f"skip: {prefix}_*_document.bin/.idx exist and are valid (--skip-existing)")
            except ValueError:
                todo.append((inputs, prefix))
        jobs = todo
    if not jobs:
        return 0
    for _, prefix in jobs:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = optimal_dtype(tok.vocab_size)
    identity = tokenizer_identity(tok)
    init = (tok.path, keys, args.append_eod, np.dtype(dtype).name)
    stats = _Stats()
    pool: Optional[multiprocessing.pool.Pool] = None

    def on_term(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")

    t0 = time.time()
    if args.workers > 1:  # fork the workers before installing our SIGTERM handler: they must not inherit it
        pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=_init_worker, initargs=init)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        if pool is not None:
            encode = lambda chunks: pool.imap(encode_chunk, chunks, chunksize=1)  # noqa: E731
        else:
            _init_worker(*init)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            encode = lambda chunks: map(encode_chunk, chunks)  # noqa: E731
        for inputs, prefix in jobs:
            process(inputs, prefix, keys, dtype, encode, args, stats, identity)
    except MalformedLine as exc:
        print(f"error: {exc}; fix the line or pass --on-error skip. Nothing written for this output.",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        print(f"error: {exc or 'interrupted'}; nothing written for the output in progress", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = max(time.time() - t0, 1e-9)
    procs = args.workers
    print(f"done: {stats.docs} documents, {stats.tokens} tokens in {elapsed:.2f}s = {stats.tokens / elapsed:,.0f} "
          f"tokens/s ({stats.tokens / elapsed / procs:,.0f} per worker process, {procs} workers); "
          f"{stats.errors} malformed line(s) skipped")
    return 0


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSONL file(s), .gz ok; concatenated in order")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize, one output each")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="tokenizer.json or a directory holding one")
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--output-per-input", action="store_true",
                   help="one output per input file: <output-prefix><file stem>_<key>_document (e.g. with "
                        "--output-prefix data/bin/, data/ko.jsonl -> data/bin/ko_text_document)")
    g.add_argument("--skip-existing", action="store_true", help="do nothing if valid outputs already exist")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in the main process)")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="on a malformed line")
    g.add_argument("--max-error-reports", type=int, default=100, help="print at most this many skipped lines")
    g.add_argument("--chunk-lines", type=int, default=1024, help="lines per work item")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes per work item (at most)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    return run(get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
