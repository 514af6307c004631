"""Which base model should the project use? Score each candidate on the task and recommend the
smallest one that is within a tolerance of the best.

Each candidate runs in its own process, so its peak memory is its own. Quality is its best
prompting baseline on the recipe's test set (recorded in the registry like every baseline, and
reused from there), optionally also a short LoRA run; latency is measured one request at a
time with the best strategy's prompts, as a user of a served model would see it.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tuneloop import models, project, tasks
from tuneloop.baselines import rag
from tuneloop.baselines.strategies import best, make_setup, prompting, recipe_baselines
from tuneloop.core.formats import load_examples
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.runner import score
from tuneloop.models import licences
from tuneloop.store import new_id
from tuneloop.core.files import atomic_write

LATENCY_SAMPLE = 16
TOLERANCE = 0.02


def compare(recipe, candidates: list[str], tolerance: float = TOLERANCE, train_steps: int = 0,
            sample: int = LATENCY_SAMPLE, accept: list[str] = (), workspace: Path | None = None,
            on_phase=None) -> dict:
    """Score every candidate; returns {"rows": [...], "recommendation": ..., "headline": ...}.

    A candidate whose licence the recipe's policy refuses is listed with the refusal and not
    run; `accept` adds licences accepted for this comparison.
    """
    if recipe.data.test is None:
        raise TuneloopError("models compare needs data.test in the recipe (the rows to score on)")
    if not candidates:
        raise TuneloopError("name the models to compare: --models a,b")
    ws = workspace or project.workspace()
    headline = tasks.headline(recipe.task)
    rows = []
    for model in candidates:
        if on_phase:
            on_phase(f"candidate: {model}")
        try:
            licence = licences.check(model, recipe.allowed_licences,
                                     [*recipe.accept_licences, *accept])
        except TuneloopError as refused:
            rows.append({"model": model, "refused": str(refused),
                         "licence": models.catalog()[model].licence["name"]})
            continue
        one = recipe.model_copy(update={"base_model": model})
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(_candidate, one, ws, train_steps, sample).result()
        rows.append({"model": model, "licence": licence["name"], **row})
    scored = [r for r in rows if "refused" not in r]
    result = {"task": recipe.task, "headline": headline, "tolerance": tolerance, "rows": rows,
              "recommendation": recommend(scored, "lora" if train_steps else "quality", tolerance)}
    target = ws / "comparisons" / f"{new_id('cmp')}.json"
    atomic_write(target, json.dumps(result, indent=2, default=str))
    result["path"] = str(target)
    return result


def recommend(rows: list[dict], key: str, tolerance: float) -> dict | None:
    """The smallest model (parameters) whose `key` is within `tolerance` of the best."""
    if not rows:
        return None
    top = max(r[key] for r in rows)
    good = [r for r in rows if r[key] >= top - tolerance]
    pick = min(good, key=lambda r: (r["parameters"], -r[key]))
    return {"model": pick["model"], key: pick[key], "best": top,
            "reason": f"smallest model within {tolerance:g} of the best {key} ({top:.3f})"}


def _candidate(recipe, ws: Path, train_steps: int, sample: int) -> dict:
    """One model's row, computed in a fresh process."""
    baselines = recipe_baselines(recipe, workspace=ws)
    strategy, quality = best(baselines, recipe.task)
    lm, tok = models.load_model(recipe.base_model), models.load_tokenizer(recipe.base_model)
    train_rows = load_examples(recipe.data.train, recipe.task)
    test_rows = load_examples(recipe.data.test, recipe.task)
    info = tasks.describe(recipe.task, train_rows, recipe.fields)
    collection = (rag.load_passages(recipe.data.documents)
                  if strategy == "rag" and recipe.data.documents else None)
    setup = make_setup(tok, recipe.base_model, info, train_rows, test_rows,
                       recipe.many_shot_tokens, recipe.seed, collection, recipe.rag_passages)
    chosen = prompting(strategy, setup)
    latencies, tokens = [], 0
    for i in range(-1, min(sample, len(test_rows))):  # request -1 warms up and is not counted
        row = max(i, 0)
        one = ({"prompts": [chosen["prompts"][row]]} if "prompts" in chosen else chosen)
        started = time.perf_counter()
        result = score(lm, tok, [test_rows[row]], info, zero_shot=True, **one)
        if i >= 0:
            latencies.append(1000 * (time.perf_counter() - started))
            tokens += result["metrics"]["output_tokens_per_s"] * result["metrics"]["generate_s"]
    row = {
        "quality": quality, "strategy": strategy,
        "baselines": {s: m[tasks.headline(recipe.task)] for s, m in baselines.items()},
        "parameters": sum(p.numel() for p in lm.parameters()),
        "context_length": models.context_length(recipe.base_model),
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": _percentile(latencies, 95),
        "tokens_per_s": tokens / (sum(latencies) / 1000),
        "prompt_tokens": baselines[strategy].get("prompt_tokens"),
    }
    if train_steps:
        from tuneloop.train.run import train

        run = train(recipe.model_copy(update={"max_steps": train_steps, "baselines": []}),
                    workspace=ws)
        row.update(lora=run[tasks.headline(recipe.task)], lora_run=run["run_id"])
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
