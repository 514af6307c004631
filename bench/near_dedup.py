"""Near-duplicate detection: tuneloop's `NearDuplicates` against datasketch used as its
documentation shows (a MinHash per row from its 5-grams, MinHashLSH insert/query), on the same
generated rows in one run: rows/s, and how many near duplicates each finds.

    python bench/near_dedup.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_prepare import generate
from tuneloop.data.clean import match_key
from tuneloop.data.dedup import NearDuplicates

THRESHOLD, PERM = 0.8, 256


def tuneloop_near(keys: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    index, found = NearDuplicates(THRESHOLD, PERM), 0
    for i, key in enumerate(keys):
        sig = index.signature(key)
        if index.match(key, sig)[0] is None:
            index.add(i, key, sig)
        else:
            found += 1
    return time.perf_counter() - start, found


def datasketch_near(keys: list[str]) -> tuple[float, int]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh, found = MinHashLSH(threshold=THRESHOLD, num_perm=PERM), 0
    for i, key in enumerate(keys):
        data = key.encode()
        m = MinHash(num_perm=PERM)
        m.update_batch([data[j:j + 5] for j in range(max(1, len(data) - 4))])
        if lsh.query(m):
            found += 1
        else:
            lsh.insert(i, m)
    return time.perf_counter() - start, found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        generate(args.rows, path)
        seen, keys = set(), []
        for line in path.open():
            key = match_key(json.loads(line)["text"])
            if key not in seen:  # near dedup runs after exact dedup
                seen.add(key)
                keys.append(key)
    t_ours, n_ours = tuneloop_near(keys)
    t_peer, n_peer = datasketch_near(keys)
    print(f"{len(keys)} distinct rows, threshold {THRESHOLD}, {PERM} permutations")
    print(f"tuneloop NearDuplicates: {t_ours:6.1f} s  {len(keys) / t_ours:7.0f} rows/s  "
          f"{n_ours} near duplicates")
    print(f"datasketch MinHash+LSH:  {t_peer:6.1f} s  {len(keys) / t_peer:7.0f} rows/s  "
          f"{n_peer} near duplicates")
    print(f"speed ratio: {t_peer / t_ours:.1f}x")


if __name__ == "__main__":
    main()
