"""Preference pairs ({prompt, chosen, rejected}) scored: each reply's summed log-probability,
how often the chosen one wins, and DPO's implicit reward against a reference (train/dpo.py
trains on the same quantities)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tuneloop.core.batching import collate, length_grouped_batches
from tuneloop.core.tokenize import encode
from tuneloop.errors import TuneloopError
from tuneloop.models import load_artifact
from tuneloop.models.scoring import dpo_loss, sequence_logps


def encode_pairs(tokenizer, examples) -> list[tuple]:
    """(chosen, rejected) encodings of each pair: same prompt, loss only on the reply."""
    missing = [e.line for e in examples if e.rejected is None]
    if missing:
        raise TuneloopError(f"method: dpo needs preference rows {{prompt, chosen, rejected}}; "
                            f"line {missing[0]} has no `rejected` reply")
    return [(encode(tokenizer, list(e.messages), e.answer),
             encode(tokenizer, list(e.messages), e.rejected)) for e in examples]


def pair_logps(model, pairs: list[tuple], idx: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of the pairs `idx`, in one batch of 2 x len(idx)."""
    rows = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
    logps = sequence_logps(model, collate(rows, pad))
    return logps[: len(idx)], logps[len(idx):]


@torch.no_grad()
def all_logps(model, pairs: list[tuple], batch_tokens: int, pad: int) -> torch.Tensor:
    """[n, 2] (chosen, rejected) log-probabilities of every pair, in input order."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    for idx in length_grouped_batches([2 * max(len(c), len(r)) for c, r in pairs], batch_tokens, 0):
        chosen, rejected = pair_logps(model, pairs, idx, pad)
        out[idx, 0], out[idx, 1] = chosen.float().cpu(), rejected.float().cpu()
    model.train(was_training)
    return out


def preference_metrics(logps: torch.Tensor, reference: torch.Tensor | None = None,
                       beta: float = 0.1) -> dict:
    """How often the model gives the chosen reply more probability than the rejected one, and
    (with a reference) DPO's implicit reward accuracy and loss."""
    margin = logps[:, 0] - logps[:, 1]
    out = {"preference_accuracy": float((margin > 0).float().mean()),
           "mean_logp_margin": float(margin.mean()), "n": len(logps)}
    if reference is not None:
        start = reference[:, 0] - reference[:, 1]
        out.update(start_preference_accuracy=float((start > 0).float().mean()),
                   reward_accuracy=float((margin > start).float().mean()),
                   dpo_loss=float(dpo_loss(logps, reference, beta).mean()))
    return out


def evaluate_pairs(model, tokenizer, examples, beta: float = 0.1,
                   start_adapter: str | None = None) -> dict:
    """Preference metrics of a DPO policy on pairs, against its start point: the adapter of the
    run it continued (`start_adapter`), else the base model (the policy's adapter disabled)."""
    pairs = encode_pairs(tokenizer, examples)
    batch_tokens = max(4096, 2 * max(max(len(c), len(r)) for c, r in pairs))
    start = time.perf_counter()
    logps = all_logps(model, pairs, batch_tokens, tokenizer.pad_token_id)
    if start_adapter:
        reference_model, _ = load_artifact(Path(start_adapter))
        reference = all_logps(reference_model, pairs, batch_tokens, tokenizer.pad_token_id)
    else:
        with model.disable_adapter():
            reference = all_logps(model, pairs, batch_tokens, tokenizer.pad_token_id)
    metrics = preference_metrics(logps, reference, beta)
    metrics["score_s"] = time.perf_counter() - start
    rows = [{"line": e.line, "chosen_logp": float(lp[0]), "rejected_logp": float(lp[1]),
             "prefers_chosen": bool(lp[0] > lp[1])} for e, lp in zip(examples, logps)]
    if not math.isfinite(metrics["mean_logp_margin"]):
        raise TuneloopError("log-probabilities are not finite; the model diverged")
    return {"metrics": metrics, "predictions": rows}
