"""Score a model on examples with a task kind's metrics."""

from __future__ import annotations

import math
import os
import time

from tuneloop import tasks
from tuneloop.core.batching import padded_batches
from tuneloop.core.tokenize import encode, prompt_ids
from tuneloop.tasks import prompts as layout
from tuneloop.models.generate import generate, generate_shared_prefix
from tuneloop.models.scoring import mean_loss


def max_new_tokens(tokenizer, examples, info) -> int:
    """Enough room for the longest expected answer, with a margin (the task's own count)."""
    return tasks.module(info.kind).max_new_tokens(tokenizer, examples, info)


def price_per_hour() -> float:
    """Machine price in USD/hour for cost figures: $TUNELOOP_PRICE_PER_HOUR, default 0.10
    (about a 2-vCPU cloud VM; set your own hardware's or GPU's price)."""
    return float(os.environ.get("TUNELOOP_PRICE_PER_HOUR", "0.10"))


def prefix_batch_size(model, prefix_len: int) -> int:
    """Rows per batch so that the copied prefix KV cache stays within ~1 GB on a CPU (where
    larger batches stop paying) and ~8 GB on a GPU."""
    gpu = model.device.type == "cuda"
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_row = prefix_len * cfg.num_hidden_layers * 2 * kv * head * model.dtype.itemsize
    return int(max(1, min(128 if gpu else 16, (8e9 if gpu else 1e9) // max(per_row, 1))))


def score(model, tokenizer, examples, info, zero_shot: bool = False, batch_tokens: int | None = None,
          on_batch=None, shots=None, prompts=None, reuse_prefix: bool = True) -> dict:
    """Generate for every example and compute the task's metrics (plus loss/perplexity for chat).

    With `shots` (a list of examples, possibly empty) every prompt starts with the same
    instruction + shots prefix, whose KV cache is computed once when `reuse_prefix`. With
    `prompts` (chat messages, one list per example) each row has its own prompt.
    Returns {"metrics": {...}, "predictions": [{"line", "output", "prediction", "gold"}]}.
    """
    module = tasks.module(info.kind)
    new_tokens = max_new_tokens(tokenizer, examples, info)
    batch_tokens = batch_tokens or (32768 if model.device.type == "cuda" else 2048)
    start = time.perf_counter()
    confidences, extras = None, []
    grammar = module.grammar(model, tokenizer, info)  # baselines decode under it too
    if shots is None:
        if prompts is None:
            prompts = [module.prompt(e, info, zero_shot=zero_shot) for e in examples]
        encoded = [prompt_ids(tokenizer, p) for p in prompts]
        decided = module.decide(model, tokenizer, encoded, info, on_batch,  # a label set
                                 messages=prompts)  # (or a span head)
        if decided is not None:
            outputs, confidences, counts, *extras = decided
        else:
            outputs, counts = generate(model, tokenizer, prompts, new_tokens,
                                       batch_tokens=batch_tokens, on_batch=on_batch,
                                       grammar=grammar)
        prompt_tokens = sum(map(len, encoded)) / max(1, len(encoded))
    else:
        prefix_ids, suffixes = layout.split_prompts(
            tokenizer, layout.prefix_messages(info, shots), examples)
        rows_per_batch = prefix_batch_size(model, len(prefix_ids))
        decided = module.decide(
            model, tokenizer, suffixes if reuse_prefix else [prefix_ids + x for x in suffixes],
            info, on_batch, prefix=prefix_ids if reuse_prefix else None,
            batch_size=rows_per_batch)
        if decided is not None:
            outputs, confidences, counts, *extras = decided
        else:
            outputs, counts = generate_shared_prefix(
                model, tokenizer, prefix_ids, suffixes, new_tokens, reuse=reuse_prefix,
                batch_size=rows_per_batch, on_batch=on_batch, grammar=grammar)
        prompt_tokens = len(prefix_ids) + sum(len(x) for x in suffixes) / max(1, len(suffixes))
    elapsed = time.perf_counter() - start
    parsed = [module.parse(o, info) for o in outputs]
    preds = [p for p, _ in parsed]
    valid = [v for _, v in parsed]
    golds = [module.gold(e, info) for e in examples]
    metrics = module.metrics(preds, golds, valid, examples)  # (extraction: hallucinated values)
    if module.REFERENCE_LOSS:  # perplexity of the reference answers, given the same prompts
        if prompts is None:
            head = layout.prefix_messages(info, shots)
            prompts = [[*head, *[m for m in e.messages if m["role"] != "system"]] for e in examples]
        enc = [encode(tokenizer, p, module.target(e)) for p, e in zip(prompts, examples)]
        loss = mean_loss(model, padded_batches(enc, tokenizer.pad_token_id, batch_tokens))
        metrics.update(loss=loss, perplexity=math.exp(loss))
    metrics["prompt_tokens"] = prompt_tokens  # mean per request
    metrics["generate_s"] = elapsed
    metrics["latency_ms_per_request"] = 1000 * elapsed / max(1, len(examples))  # batched, amortized
    # USD/hour x hours per 1,000 requests: latency_ms x 1000 requests / 1000 ms / 3600 s.
    metrics["cost_per_1k_requests"] = price_per_hour() * metrics["latency_ms_per_request"] / 3600
    if shots is not None:
        metrics.update(shots=len(shots), prefix_tokens=len(prefix_ids))
    metrics["output_tokens_per_s"] = sum(counts) / elapsed if elapsed else 0.0
    rows = [{"line": e.line, "output": o, "prediction": p, "gold": g}
            for e, o, p, g in zip(examples, outputs, preds, golds)]
    if confidences is not None:
        for row, c in zip(rows, confidences):
            row["confidence"] = c
        metrics["calibration"] = calibration(confidences, [r["prediction"] == r["gold"]
                                                            for r in rows])
    for row, extra in zip(rows, extras[0] if extras else []):
        row.update(extra)  # (a span head's: each value's confidence)
    judged = module.value_confidences(rows)
    if judged is not None:  # each value's confidence against whether the gold holds it
        metrics["value_calibration"] = calibration(*judged)
    metrics["ci95"] = interval(info.kind, rows)
    return {"metrics": metrics, "predictions": rows}


def calibration(confidences: list[float], correct: list[bool], bins: int = 10) -> dict:
    """Accuracy against confidence in `bins` equal-width bins (a reliability diagram) and the
    expected calibration error: the rows' share-weighted |accuracy - confidence| over bins
    (Guo et al. 2017, "On Calibration of Modern Neural Networks")."""
    n = len(confidences)
    table, ece = [], 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [i for i, c in enumerate(confidences)
                  if low <= c < high or (b == bins - 1 and c == 1.0)]
        if not inside:
            continue
        acc = sum(correct[i] for i in inside) / len(inside)
        conf = sum(confidences[i] for i in inside) / len(inside)
        ece += len(inside) / n * abs(acc - conf)
        table.append({"low": low, "high": high, "n": len(inside), "accuracy": acc,
                      "confidence": conf})
    return {"ece": ece, "bins": table,
            "mean_confidence": sum(confidences) / n if n else 0.0}


def interval(kind: str, rows: list[dict]) -> dict:
    """The headline metric's 95% bootstrap interval over the rows; where the task's headline
    adds up counts of values (extraction's micro field F1), of that metric itself, overall and
    of each field (`by_field`)."""
    from tuneloop.evaluate.compare import LEVEL, bootstrap_f1, bootstrap_interval, row_scores

    module = tasks.module(kind)
    table = module.value_counts_table(rows)
    if table is None:
        low, high = bootstrap_interval(row_scores(kind, rows))
        return {"metric": module.HEADLINE, "low": low, "high": high, "level": LEVEL}
    names, counts = table
    low, high = bootstrap_f1(counts.sum(axis=1))
    by_field = {name: dict(zip(("low", "high"), bootstrap_f1(counts[:, i])))
                for i, name in enumerate(names)}
    return {"metric": module.HEADLINE, "low": low, "high": high, "level": LEVEL,
            "by_field": by_field}
