"""Duplicates: exact (after `match_key`), near (MinHash LSH over 5-grams, datasketch's banding)
and, optionally, semantic (MiniLM sentence embeddings, cosine).

Each index answers "which earlier text is this a duplicate of?", so a stream keeps the first of
every cluster and reports the rest against it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tuneloop.data.clean import match_key
from tuneloop.errors import TuneloopError


def exact_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()



class NearDuplicates:
    """MinHash LSH over byte 5-grams of `match_key` text.

    Signatures are computed for a whole row at once with numpy (one n-gram → integer map, one
    (shingles x permutations) product), which is what lets cleaning and deduplication run at
    thousands of rows a second. The banding (how many bands of how many rows) is datasketch's
    optimum for the threshold; candidates that share a band are confirmed by the share of equal
    signature positions, the MinHash estimate of their Jaccard similarity.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 256, shingle: int = 5, seed: int = 1):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise TuneloopError(f"near-duplicate threshold {threshold}: use a Jaccard "
                                "similarity in (0, 1], e.g. 0.8")
        self.threshold, self.num_perm, self.n = threshold, num_perm, shingle
        # Bands tuned below the threshold: LSH misses few pairs just above it, and the
        # signature comparison turns the extra candidates away.
        lsh = MinHashLSH(threshold=max(0.1, threshold - 0.15), num_perm=num_perm)
        self.band_count, self.band_rows = lsh.b, lsh.r
        rng = np.random.RandomState(seed)
        self.a = rng.randint(1, 1 << 62, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64)
        self.band_mix = rng.randint(1, 1 << 62, size=lsh.r, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        # band key → entry index, or a list of them once two share it (most keys have one)
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(lsh.b)]
        self.signatures = np.empty((1024, num_perm), np.uint32)
        self.ids: list[int] = []

    def signature(self, key: str) -> np.ndarray:
        data = np.frombuffer(key.encode().ljust(self.n), dtype=np.uint8).astype(np.uint64)
        count = len(data) - self.n + 1
        grams = data[:count].copy()
        for k in range(1, self.n):  # each n-gram as one integer (5 bytes fit in 40 bits)
            grams = (grams << np.uint64(8)) | data[k:k + count]
        grams = np.unique(grams)
        # Multiply-shift hashing, one (a, b) pair per permutation; the high 32 bits are kept.
        return ((grams[:, None] * self.a + self.b) >> np.uint64(32)).min(axis=0).astype(np.uint32)

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        """One 64-bit key per band (its rows mixed), so each band table is keyed by an int."""
        bands = sig[:self.band_count * self.band_rows].reshape(self.band_count, self.band_rows)
        return (bands.astype(np.uint64) @ self.band_mix).tolist()

    def match(self, key: str, sig: np.ndarray | None = None) -> tuple[int | None, float]:
        """The earlier entry this key is a near-duplicate of (most similar), and the similarity."""
        sig = self.signature(key) if sig is None else sig
        candidates = set()
        for table, band in zip(self.tables, self._band_keys(sig)):
            found = table.get(band)
            if found is None:
                continue
            if isinstance(found, int):
                candidates.add(found)
            else:
                candidates.update(found)
        best, best_sim = None, 0.0
        for slot in sorted(candidates):
            sim = float(np.count_nonzero(self.signatures[slot] == sig)) / self.num_perm
            if sim >= self.threshold and sim > best_sim:
                best, best_sim = self.ids[slot], sim
        return best, best_sim

    def add(self, index: int, key: str, sig: np.ndarray | None = None) -> None:
        sig = self.signature(key) if sig is None else sig
        slot = len(self.ids)
        if slot == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[slot] = sig
        self.ids.append(index)
        for table, band in zip(self.tables, self._band_keys(sig)):
            found = table.get(band)
            if found is None:
                table[band] = slot
            elif isinstance(found, int):
                table[band] = [found, slot]
            else:
                found.append(slot)


def semantic_duplicates(texts: list[str], threshold: float = 0.95, chunk: int = 1024
                        ) -> dict[int, tuple[int, float]]:
    """{index: (earlier kept index, cosine)} for texts whose meaning repeats an earlier kept one."""
    import torch

    from tuneloop.models.embed import embed

    if not texts:
        return {}
    vectors = embed(texts)
    dupes: dict[int, tuple[int, float]] = {}
    kept: list[int] = []
    for start in range(0, len(texts), chunk):
        block = vectors[start:start + chunk]
        prior = vectors[kept] if kept else torch.empty(0, vectors.shape[1])
        against_prior = block @ prior.T
        within = block @ block.T
        for i in range(len(block)):
            index = start + i
            best, best_sim = None, threshold
            if kept:
                sim, j = against_prior[i].max(0)
                if sim >= best_sim:
                    best, best_sim = kept[int(j)], float(sim)
            for j in range(i):  # earlier rows of this block that were kept
                if start + j in dupes:
                    continue
                if within[i, j] >= best_sim and (best is None or within[i, j] > best_sim):
                    best, best_sim = start + j, float(within[i, j])
            if best is not None:
                dupes[index] = (best, round(best_sim, 4))
        kept.extend(start + i for i in range(len(block)) if start + i not in dupes)
    return dupes


__all__ = ["NearDuplicates", "exact_digest", "match_key", "semantic_duplicates"]
