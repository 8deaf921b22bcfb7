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
valid existing outputs alone.
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


def _init_worker(tokenizer_path: str, json_keys: List[str], append_eod: bool, dtype_name: str,
                 files: List[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles interrupts
    from tri_megatron.data.tokenizer import TriTokenizer

    tok = TriTokenizer(tokenizer_path)
    _STATE.update(tok=tok, keys=json_keys, eod=tok.eod if append_eod else None, dtype=np.dtype(dtype_name),
                  files=files)


def encode_chunk(chunk: Tuple[int, int, List[str]]):
    """(file index, first line number, lines) -> per key (tokens, lengths), errors, docs, bytes."""
    file_idx, first_line, lines = chunk
    keys, tok, eod, dtype = _STATE["keys"], _STATE["tok"], _STATE["eod"], _STATE["dtype"]
    path = _STATE["files"][file_idx]
    texts = {k: [] for k in keys}  # per key: list of (doc position, text)
    errors, docs, nbytes = [], 0, 0
    for offset, line in enumerate(lines):
        nbytes += len(line.encode("utf-8")) if not line.isascii() else len(line)
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
            if isinstance(v, list) and all(isinstance(s, str) for s in v):
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
        ids = [x for x in ids if x]  # documents with no tokens are dropped, as Megatron-LM does
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        if eod is not None:
            lengths += 1
            flat = itertools.chain.from_iterable(itertools.chain.from_iterable(zip(ids, itertools.repeat((eod,)))))
        else:
            flat = itertools.chain.from_iterable(ids)
        tokens = np.fromiter(flat, dtype=dtype, count=int(lengths.sum()))
        out[k] = (tokens, lengths)
    return out, errors, docs, nbytes


def read_chunks(files: List[str], chunk_lines: int, chunk_bytes: int):
    for file_idx, path in enumerate(files):
        with open_text(path) as f:
            lines, size, first = [], 0, 1
            for line_no, line in enumerate(f, start=1):
                if not lines:
                    first = line_no
                lines.append(line)
                size += len(line)
                if len(lines) >= chunk_lines or size >= chunk_bytes:
                    yield file_idx, first, lines
                    lines, size = [], 0
            if lines:
                yield file_idx, first, lines


def output_paths(prefix: str, key: str) -> Tuple[str, str]:
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"


def run(args) -> int:
    from tri_megatron.data.indexed import check_indexed_dataset, make_builder, optimal_dtype
    from tri_megatron.data.tokenizer import TriTokenizer

    for path in args.input:
        if not os.path.isfile(path):
            print(f"error: --input {path}: file not found", file=sys.stderr)
            return 2
    try:
        tok = TriTokenizer(args.tokenizer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = args.json_keys
    if args.skip_existing:
        prefixes = [f"{args.output_prefix}_{k}_document" for k in keys]
        try:
            for p in prefixes:
                check_indexed_dataset(p, "--output-prefix")
            print(f"skip: {', '.join(prefixes)} already exist and are valid (--skip-existing)")
            return 0
        except ValueError:
            pass
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    dtype = optimal_dtype(tok.vocab_size)
    finals = {k: output_paths(args.output_prefix, k) for k in keys}
    tmps = {k: tuple(f"{p}.tmp.{os.getpid()}" for p in finals[k]) for k in keys}
    builders = {k: make_builder(tmps[k][0], dtype) for k in keys}
    total_bytes = sum(os.path.getsize(p) for p in args.input)
    init = (tok.path, keys, args.append_eod, np.dtype(dtype).name, list(args.input))
    chunks = read_chunks(args.input, args.chunk_lines, args.chunk_bytes)
    n_docs = n_tokens = n_errors = done_bytes = 0
    t0 = time.time()
    ok = False
    pool: Optional[multiprocessing.pool.Pool] = None

    def on_term(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        from tqdm import tqdm

        if args.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=_init_worker, initargs=init)
            results = pool.imap(encode_chunk, chunks, chunksize=1)
        else:
            _init_worker(*init)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            results = map(encode_chunk, chunks)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", disable=args.quiet,
                   mininterval=1.0, dynamic_ncols=True)
        for out, errors, docs, nbytes in results:
            if errors:
                n_errors += len(errors)
                for e in errors:
                    if args.on_error == "fail":
                        raise MalformedLine(e)
                    if n_errors <= args.max_error_reports:
                        bar.write(f"skipped {e}")
            for k in keys:
                tokens, lengths = out[k]
                builders[k].add_documents(tokens, lengths)
                n_tokens += int(tokens.size)
            n_docs += docs
            done_bytes += nbytes
            bar.update(nbytes)
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"docs={n_docs} tok/s={n_tokens / elapsed:,.0f}", refresh=False)
        bar.close()
        for k in keys:
            builders[k].finalize(tmps[k][1])
        for k in keys:
            os.replace(tmps[k][0], finals[k][0])
            os.replace(tmps[k][1], finals[k][1])
        ok = True
    except MalformedLine as exc:
        print(f"error: {exc}; fix the line or pass --on-error skip. No output written.", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        print(f"error: {exc or 'interrupted'}; no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if pool is not None:
            pool.terminate()
            pool.join()
        if not ok:
            for k in keys:
                try:
                    builders[k].data_file.close()
                except Exception:
                    pass
                for p in tmps[k]:
                    if os.path.exists(p):
                        os.remove(p)
    elapsed = time.time() - t0
    procs = max(1, args.workers)
    print(f"done: {n_docs} documents, {n_tokens} tokens in {elapsed:.2f}s = {n_tokens / elapsed:,.0f} tokens/s "
          f"({n_tokens / elapsed / procs:,.0f} per worker process, {procs} workers); "
          f"{n_errors} malformed line(s) skipped")
    for k in keys:
        print(f"wrote {finals[k][0]} and {finals[k][1]}")
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
