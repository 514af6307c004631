"""Score a model on examples with a task kind's metrics."""

from __future__ import annotations

import math
import time

from tuneloop import tasks
from tuneloop.data.batching import collate, length_grouped_batches
from tuneloop.data.tokenize import encode
from tuneloop.evaluate.generate import generate
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


def score(model, tokenizer, examples, info, zero_shot: bool = False, batch_tokens: int = 2048,
          on_batch=None) -> dict:
    """Generate for every example and compute the task's metrics (plus loss/perplexity for chat).

    Returns {"metrics": {...}, "predictions": [{"line", "output", "prediction", "gold"}]}.
    """
    module = tasks.TASKS[info.kind]
    prompts = [module.prompt(e, info, zero_shot=zero_shot) for e in examples]
    start = time.perf_counter()
    outputs, counts = generate(model, tokenizer, prompts, max_new_tokens(tokenizer, examples, info),
                               batch_tokens=batch_tokens, on_batch=on_batch)
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
    metrics["output_tokens_per_s"] = sum(counts) / elapsed if elapsed else 0.0
    rows = [{"line": e.line, "output": o, "prediction": p, "gold": g}
            for e, o, p, g in zip(examples, outputs, preds, golds)]
    return {"metrics": metrics, "predictions": rows}
