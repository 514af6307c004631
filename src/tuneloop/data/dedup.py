"""Duplicates: exact (after `match_key`), near (MinHash LSH over character 5-grams, datasketch)
and, optionally, semantic (MiniLM sentence embeddings, cosine).

Each index answers "which earlier text is this a duplicate of?", so a stream keeps the first of
every cluster and reports the rest against it.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from tuneloop.data.clean import match_key
from tuneloop.errors import TuneloopError


def exact_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def shingles(key: str, n: int = 5) -> set[bytes]:
    """Character n-grams: robust to small edits in short texts, where word n-grams are few."""
    data = key.encode()
    if len(key) <= n:
        return {data}
    return {key[i:i + n].encode() for i in range(len(key) - n + 1)}


class NearDuplicates:
    """MinHash LSH: candidates from banded signatures, confirmed by their estimated Jaccard."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold <= 1:
            raise TuneloopError(f"near-duplicate threshold {threshold}: use a Jaccard "
                                "similarity in (0, 1], e.g. 0.8")
        self.threshold, self.num_perm, self.n = threshold, num_perm, shingle
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
        self._minhash = MinHash
        # Bands tuned below the threshold: LSH misses few pairs just above it, and the
        # signature comparison below turns the extra candidates away.
        self.lsh = MinHashLSH(threshold=max(0.1, threshold - 0.15), num_perm=num_perm)
        self.signatures: dict[int, np.ndarray] = {}

    def signature(self, key: str):
        m = self._minhash(num_perm=self.num_perm, hashfunc=zlib.crc32,
                          permutations=self._template.permutations, scheme=self._template.scheme)
        m.update_batch(list(shingles(key, self.n)))
        return m

    def match(self, key: str, sig=None) -> tuple[int | None, float]:
        """The earlier entry this key is a near-duplicate of (most similar), and the similarity."""
        sig = sig if sig is not None else self.signature(key)
        best, best_sim = None, 0.0
        for other in self.lsh.query(sig):
            sim = float(np.mean(self.signatures[other] == sig.hashvalues))
            if sim >= self.threshold and (sim > best_sim or (sim == best_sim and other < best)):
                best, best_sim = other, sim
        return best, best_sim

    def add(self, index: int, key: str, sig=None) -> None:
        sig = sig if sig is not None else self.signature(key)
        self.lsh.insert(index, sig, check_duplication=False)
        self.signatures[index] = sig.hashvalues.astype(np.uint32)


def semantic_duplicates(texts: list[str], threshold: float = 0.95, chunk: int = 1024
                        ) -> dict[int, tuple[int, float]]:
    """{index: (earlier kept index, cosine)} for texts whose meaning repeats an earlier kept one."""
    import torch

    from tuneloop.baselines.retrieve import embed

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


__all__ = ["NearDuplicates", "exact_digest", "match_key", "semantic_duplicates", "shingles"]
