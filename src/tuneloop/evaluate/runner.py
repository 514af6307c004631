"""Score a model on examples with a task kind's metrics."""

from __future__ import annotations

import math
import os
import time

from tuneloop import tasks
from tuneloop.data.batching import padded_batches
from tuneloop.data.tokenize import encode, prompt_ids
from tuneloop.baselines import shots as shots_lib
from tuneloop.evaluate.generate import generate, generate_shared_prefix
from tuneloop.models.scoring import mean_loss


def max_new_tokens(tokenizer, examples, info) -> int:
    """Enough room for the longest expected answer, with a margin."""
    module = tasks.TASKS[info.kind]
    if info.kind == "classify":
        longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"])
                      for label in info.labels)
        return longest + 4
    longest = max(len(tokenizer(module.target(e, info), add_special_tokens=False)["input_ids"])
                  for e in examples)
    return min(512, int(longest * 1.5) + 16)


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
    module = tasks.TASKS[info.kind]
    new_tokens = max_new_tokens(tokenizer, examples, info)
    batch_tokens = batch_tokens or (32768 if model.device.type == "cuda" else 2048)
    start = time.perf_counter()
    confidences = None
    grammar = _schema_grammar(model, tokenizer, info)  # baselines decode under it too
    if shots is None:
        if prompts is None:
            prompts = [module.prompt(e, info, zero_shot=zero_shot) for e in examples]
        encoded = [prompt_ids(tokenizer, p) for p in prompts]
        if info.kind == "classify" and info.labels:  # decoded within the label set
            outputs, confidences, counts = classify_constrained(model, tokenizer, encoded, info,
                                                                on_batch)
        else:
            outputs, counts = generate(model, tokenizer, prompts, new_tokens,
                                       batch_tokens=batch_tokens, on_batch=on_batch,
                                       grammar=grammar)
        prompt_tokens = sum(map(len, encoded)) / max(1, len(encoded))
    else:
        prefix_ids, suffixes = shots_lib.split_prompts(
            tokenizer, shots_lib.prefix_messages(info, shots), examples)
        rows_per_batch = prefix_batch_size(model, len(prefix_ids))
        if info.kind == "classify" and info.labels:
            outputs, confidences, counts = classify_constrained(
                model, tokenizer, suffixes if reuse_prefix else [prefix_ids + x for x in suffixes],
                info, on_batch, prefix=prefix_ids if reuse_prefix else None,
                batch_size=rows_per_batch)
        else:
            outputs, counts = generate_shared_prefix(
                model, tokenizer, prefix_ids, suffixes, new_tokens, reuse=reuse_prefix,
                batch_size=rows_per_batch, on_batch=on_batch, grammar=grammar)
        prompt_tokens = len(prefix_ids) + sum(len(x) for x in suffixes) / max(1, len(suffixes))
    elapsed = time.perf_counter() - start
    parsed = [module.parse(o, info) for o in outputs]
    preds = [p for p, _ in parsed]
    valid = [v for _, v in parsed]
    golds = [tasks.extract.canonical(e.fields, info) if info.kind == "extract"
             else module.target(e) for e in examples]
    if info.kind == "extract":  # with the inputs: values found in no input are counted
        metrics = module.metrics(preds, golds, valid, texts=[_text(e) for e in examples])
    else:
        metrics = module.metrics(preds, golds, valid)
    if info.kind == "chat":  # perplexity of the reference answers, given the same prompts
        if prompts is None:
            head = shots_lib.prefix_messages(info, shots)
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
    metrics["ci95"] = interval(info.kind, rows)
    return {"metrics": metrics, "predictions": rows}


def _schema_grammar(model, tokenizer, info):
    """An extraction task's fields as the grammar every reply is decoded under (None for
    other tasks: a classifier is scored over its label trie, chat is free text)."""
    if info.kind != "extract" or not info.fields:
        return None
    from tuneloop.tasks import extract

    compiler = extract.grammar_compiler(tokenizer, model.get_output_embeddings().weight.shape[0],
                                        {tokenizer.eos_token_id})
    return extract.compile_schema(compiler, extract.schema(info))


def _text(example) -> str:
    return example.text or " ".join(m["content"] for m in example.messages)


def classify_constrained(model, tokenizer, prompts: list[list[int]], info, on_batch=None,
                         prefix: list[int] | None = None, batch_size: int = 16
                         ) -> tuple[list[str], list[float], list[int]]:
    """Each prompt's (token ids, after `prefix` if given) most probable label under the label
    trie (tasks.labels), its probability, and the tokens its answer takes (the label's tokens
    and end-of-turn)."""
    from tuneloop.tasks.labels import LabelTrie, label_distribution

    trie = LabelTrie(tokenizer, info.labels)
    probs = label_distribution(model, tokenizer, trie, prompts, batch_size=batch_size,
                               on_batch=on_batch, prefix=prefix)
    best = probs.argmax(-1).tolist()
    lengths = {i: len(trie.path[n]) for n, i in trie.leaf.items()}
    return ([info.labels[b] for b in best], [float(probs[r, b]) for r, b in enumerate(best)],
            [lengths[b] for b in best])


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
    """The headline metric's 95% bootstrap interval over the rows; for extraction, of the micro
    field F1 itself, overall and of each field (`by_field`)."""
    import numpy as np

    from tuneloop.evaluate.compare import LEVEL, bootstrap_f1, bootstrap_interval, row_scores

    if kind != "extract":
        low, high = bootstrap_interval(row_scores(kind, rows))
        return {"metric": tasks.HEADLINE[kind], "low": low, "high": high, "level": LEVEL}
    names = sorted({k for r in rows for k in r["gold"]})
    counts = np.array([tasks.extract.value_counts(r["prediction"], r["gold"], names)
                       for r in rows], dtype=np.int64).reshape(len(rows), len(names), 3)
    low, high = bootstrap_f1(counts.sum(axis=1))
    by_field = {name: dict(zip(("low", "high"), bootstrap_f1(counts[:, i])))
                for i, name in enumerate(names)}
    return {"metric": "field_f1", "low": low, "high": high, "level": LEVEL, "by_field": by_field}
