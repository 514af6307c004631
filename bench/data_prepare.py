"""Throughput and memory of `tuneloop data prepare` on generated rows, 10,000 and 100,000.

Each configuration runs in a fresh process (peak RSS is that process's), on a JSONL file
written beforehand; rows are support-ticket-like sentences with 8% exact and 5% near
duplicates and 5% carrying an e-mail, phone or IBAN.

  clean+dedup      ingest, clean, exact + MinHash near dedup, split (anonymization off)
  +pii-patterns    the same plus the pattern layer (Presidio recognizers, no name model)
  streaming only   ingest, clean, pattern layer, split; dedup off (the steps that stream)
  pii-ner          the name model layer alone, on 2,000 rows (rows/s)

    python bench/data_prepare.py [--sizes 10000 100000] [--out bench/data_prepare.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("card payment transfer account refund fee balance top-up exchange rate pending declined "
         "cash withdrawal statement limit verify identity app phone address branch loan savings "
         "deposit interest overdraft charge merchant online contactless pin blocked stolen lost "
         "delivery travel currency euro pound dollar weekend yesterday today morning urgent please "
         "help why when how can my the a to is was not").split()
CONFIGS = {
    "clean+dedup": {"anonymize": {"enabled": False}},
    "+pii-patterns": {"anonymize": {"ner": False}},
    "streaming only": {"anonymize": {"ner": False},
                       "dedup": {"exact": False, "near": {"enabled": False}},
                       "split": {"group_near_duplicates": False}},
}


def generate(n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        r = rng.random()
        if r < 0.08 and rows:
            row = dict(rng.choice(rows))  # exact duplicate
        elif r < 0.13 and rows:
            base = rng.choice(rows)  # near duplicate: one word changed
            words = base["text"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            row = {"text": " ".join(words), "label": base["label"]}
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            text = text.capitalize() + f" ref {i}?"
            if rng.random() < 0.05:
                text += rng.choice([f" write to client{i}@example.com",
                                    " call +44 20 7946 0958", " IBAN GB82 WEST 1234 5698 7654 32"])
            row = {"text": text, "label": f"intent_{rng.randrange(20)}"}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def child(path: str, config: str) -> None:
    from tuneloop.data.curate import prepare
    from tuneloop.data.prepare_recipe import PrepareRecipe

    spec = {"task": "classify", "inputs": [{"path": path}], "report": {"model": None},
            **CONFIGS[config]}
    with tempfile.TemporaryDirectory() as ws:
        start = time.perf_counter()
        version = prepare(recipe=PrepareRecipe.model_validate(spec), workspace=Path(ws))
        wall = time.perf_counter() - start
    kept = sum(s["rows"] for s in version.report["splits"].values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": round(wall, 2), "kept": kept, "peak_rss_mb": round(peak_mb)}))


def ner_rate(path: Path, n: int = 2000) -> float:
    from tuneloop.data import pii

    texts = [json.loads(line)["text"] for line in path.open()][:n]
    detector = pii.Detector()
    detector.find_many(texts[:50])
    start = time.perf_counter()
    detector.find_many(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"rows-{n}.jsonl"
            generate(n, path)
            for config in CONFIGS:
                proc = subprocess.run([sys.executable, __file__, "--child", str(path), config],
                                      capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["rows_per_s"] = round(n / r["wall_s"])
                results.setdefault(config, {})[n] = r
                print(f"{config:15s} {n:>7} rows: {r['wall_s']:7.1f} s  {r['rows_per_s']:>6} rows/s  "
                      f"peak {r['peak_rss_mb']} MB  kept {r['kept']}", flush=True)
        results["pii-ner rows/s"] = round(ner_rate(Path(tmp) / f"rows-{args.sizes[0]}.jsonl"), 1)
    small, large = min(args.sizes), max(args.sizes)
    for config in CONFIGS:
        r = results[config]
        results[config]["time_ratio"] = round(r[large]["wall_s"] / r[small]["wall_s"], 2)
        print(f"{config}: {large // small}x rows took {results[config]['time_ratio']}x time; "
              f"peak memory {r[small]['peak_rss_mb']} → {r[large]['peak_rss_mb']} MB")
    print(f"name model layer: {results['pii-ner rows/s']} rows/s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
