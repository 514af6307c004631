"""Memory of a server compiling distinct client JSON schemas: xgrammar's own cache bounded in
bytes against tuneloop's GrammarCache (tasks/extract.py) with the same bound, side by side.

    python bench/grammar_memory.py --schemas 4 --values 20000

Each schema is a new enum of `--values` strings (nothing compiled before can be reused; at
20,000 values one grammar is ~44 MB, so each pushes the one before out of the cache). Each
side runs in a process of its own, and the
process's resident memory is read after each schema, with malloc_trim (glibc) first so that
freed memory the allocator could return does not count. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

import psutil

BOUND = 64 * 2**20


def side(kind: str, schemas: int, values: int) -> list[tuple[int, int]]:
    import xgrammar as xgr

    from tuneloop import models
    from tuneloop.tasks import extract

    tok = models.load_tokenizer("smollm2-135m-instruct")
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=49152,
                                              stop_token_ids=[tok.eos_token_id])
    if kind == "xgrammar":
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=BOUND)

        def get(text):
            return extract.compile_schema(compiler, text)

        def kept():
            return compiler.get_cache_size_bytes()
    else:
        cache = extract.GrammarCache(xgr.GrammarCompiler(info, max_threads=1,
                                                         cache_enabled=False), BOUND)
        get, kept = cache.get, (lambda: cache.bytes)
    trim, process = ctypes.CDLL("libc.so.6").malloc_trim, psutil.Process()
    get(json.dumps({"type": "object", "properties": {"f": {"type": "string"}}}))  # warm
    trim(0)
    rows = [(process.memory_info().rss >> 20, kept() >> 20)]
    for k in range(schemas):
        get(json.dumps({"enum": [f"v{k}-{i}" for i in range(values)]}))
        trim(0)
        rows.append((process.memory_info().rss >> 20, kept() >> 20))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemas", type=int, default=4)
    parser.add_argument("--values", type=int, default=20000)
    parser.add_argument("--side", choices=["xgrammar", "tuneloop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.schemas, args.values)))
        return
    results = {}
    for kind in ("xgrammar", "tuneloop"):
        out = subprocess.run([sys.executable, __file__, "--side", kind, "--schemas",
                              str(args.schemas), "--values", str(args.values)],
                             capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.schemas} distinct enums of {args.values:,} values; cache bound "
          f"{BOUND >> 20} MiB\n")
    print("| after schema | xgrammar's cache: RSS MB (kept MB) | GrammarCache: RSS MB (kept MB) |")
    print("|---|---|---|")
    for k, (a, b) in enumerate(zip(results["xgrammar"], results["tuneloop"])):
        print(f"| {k or 'start'} | {a[0]} ({a[1]}) | {b[0]} ({b[1]}) |")


if __name__ == "__main__":
    main()
