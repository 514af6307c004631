"""Score a model on examples with a task kind's metrics."""

from __future__ import annotations

import math
import os
import time

from tuneloop import tasks
from tuneloop.data.batching import collate, length_grouped_batches
from tuneloop.data.tokenize import encode
from tuneloop.baselines import shots as shots_lib
from tuneloop.evaluate.generate import generate, generate_shared_prefix
from tuneloop.train.loss import mean_loss


def max_new_tokens(tokenizer, examples, info) -> int:
    """Enough room for the longest expected answer, with a margin."""
    module = tasks.TASKS[info.kind]
    if info.kind == "classify":
        longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"])
                      for label in info.labels)
        return longest + 4
    longest = max(len(tokenizer(module.target(e), add_special_tokens=False)["input_ids"])
                  for e in examples)
    return min(512, int(longest * 1.5) + 16)


def price_per_hour() -> float:
    """Machine price in USD/hour for cost figures: $TUNELOOP_PRICE_PER_HOUR, default 0.10
    (about a 2-vCPU cloud VM; set your own hardware's or GPU's price)."""
    return float(os.environ.get("TUNELOOP_PRICE_PER_HOUR", "0.10"))


def prefix_batch_size(model, prefix_len: int, budget_bytes: float = 1e9) -> int:
    """Rows per batch so that the copied prefix KV cache stays within ~1 GB."""
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_row = prefix_len * cfg.num_hidden_layers * 2 * kv * head * 4
    return int(max(1, min(16, budget_bytes // max(per_row, 1))))


def score(model, tokenizer, examples, info, zero_shot: bool = False, batch_tokens: int = 2048,
          on_batch=None, shots=None, reuse_prefix: bool = True) -> dict:
    """Generate for every example and compute the task's metrics (plus loss/perplexity for chat).

    With `shots` (a list of examples, possibly empty) every prompt starts with the same
    instruction + shots prefix, whose KV cache is computed once when `reuse_prefix`. With a
    list of shot lists, one per example, each prompt has its own shots (no shared prefix).
    Returns {"metrics": {...}, "predictions": [{"line", "output", "prediction", "gold"}]}.
    """
    module = tasks.TASKS[info.kind]
    new_tokens = max_new_tokens(tokenizer, examples, info)
    per_row = bool(shots) and isinstance(shots[0], list)
    start = time.perf_counter()
    if shots is None or per_row:
        prompts = ([module.prompt(e, info, zero_shot=zero_shot) for e in examples] if shots is None
                   else [[*shots_lib.prefix_messages(info, row_shots),
                          *[m for m in e.messages if m["role"] != "system"]]
                         for e, row_shots in zip(examples, shots)])
        outputs, counts = generate(model, tokenizer, prompts, new_tokens, batch_tokens=batch_tokens,
                                   on_batch=on_batch)
    else:
        prefix_ids, suffixes = shots_lib.split_prompts(
            tokenizer, shots_lib.prefix_messages(info, shots), examples)
        outputs, counts = generate_shared_prefix(
            model, tokenizer, prefix_ids, suffixes, new_tokens, reuse=reuse_prefix,
            batch_size=prefix_batch_size(model, len(prefix_ids)), on_batch=on_batch)
    elapsed = time.perf_counter() - start
    parsed = [module.parse(o, info) for o in outputs]
    preds = [p for p, _ in parsed]
    valid = [v for _, v in parsed]
    golds = [e.fields if info.kind == "extract" else module.target(e) for e in examples]
    metrics = module.metrics(preds, golds, valid)
    if info.kind == "chat":
        enc = [encode(tokenizer, module.prompt(e, info), module.target(e)) for e in examples]
        order = length_grouped_batches([len(x) for x in enc], batch_tokens, seed=0)
        loss = mean_loss(model, (collate([enc[i] for i in b], tokenizer.pad_token_id) for b in order))
        metrics.update(loss=loss, perplexity=math.exp(loss))
    metrics["generate_s"] = elapsed
    metrics["latency_ms_per_request"] = 1000 * elapsed / max(1, len(examples))  # batched, amortized
    # USD/hour x hours per 1,000 requests: latency_ms x 1000 requests / 1000 ms / 3600 s.
    metrics["cost_per_1k_requests"] = price_per_hour() * metrics["latency_ms_per_request"] / 3600
    if per_row:
        metrics.update(shots=len(shots[0]))
    elif shots is not None:
        metrics.update(shots=len(shots), prefix_tokens=len(prefix_ids))
    metrics["output_tokens_per_s"] = sum(counts) / elapsed if elapsed else 0.0
    rows = [{"line": e.line, "output": o, "prediction": p, "gold": g}
            for e, o, p, g in zip(examples, outputs, preds, golds)]
    return {"metrics": metrics, "predictions": rows}
