"""Evaluation: batched generation, the task kind's metrics, and reports."""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop import methods, project, tasks
from tuneloop.core.formats import load_examples
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.pairs import evaluate_pairs
from tuneloop.evaluate.runner import score
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry, new_id
from tuneloop.tasks.trained import load_for_eval
from tuneloop.core.formats import file_sha256


def evaluate(model: str, data: str | Path, task: str | None = None,
             labels_from: str | Path | None = None, workspace: Path | None = None,
             on_batch=None) -> dict:
    """Score a base model (zero-shot prompt) or a run (its adapter and training prompt) on data.

    For a base model the label set / field names come from `labels_from` (the training file)
    when given, else from `data` itself.
    """
    ws = workspace or project.workspace()
    registry = Registry.open(ws)
    lm, tokenizer, info, run = load_for_eval(model, registry)
    if run is not None:
        if task and task != info.kind:
            raise TuneloopError(f"run {run.id} was trained for task '{info.kind}', not '{task}'")
        task = info.kind
    elif task is None:
        raise TuneloopError("--task is required when evaluating a base model "
                            "(classify, extract or chat)")
    examples = load_examples(data, task)
    zero_shot = run is None
    if run is not None and methods.method(run.method).trains_on == "pairs":  # by log-probabilities
        meta = json.loads((Path(run.adapter_path) / "tuneloop.json").read_text())
        result = evaluate_pairs(lm, tokenizer, examples, beta=meta["beta"],
                                start_adapter=meta["start_adapter"])
    else:
        if info is None:
            info = tasks.describe(task, load_examples(labels_from, task) if labels_from else examples)
        result = score(lm, tokenizer, examples, info, zero_shot=zero_shot, on_batch=on_batch)
    ds = registry.add_dataset(file_sha256(data), str(data), len(examples), task)
    eval_id = new_id("ev")
    strategy = "zero-shot" if zero_shot else "fine-tuned"
    record_evaluation(registry, ws / "evaluations" / eval_id, result, model=model,
                      run_id=run.id if run else None, dataset=ds.id, strategy=strategy, task=task)
    flat = {k: v for k, v in result["metrics"].items() if not isinstance(v, dict)}
    calibration = result["metrics"].get("calibration")
    if calibration:  # a classifier's: each prediction's confidence is in the predictions file
        flat.update(ece=calibration["ece"], mean_confidence=calibration["mean_confidence"])
    return {"model": model, "task": task, "strategy": strategy, **flat, "evaluation": eval_id,
            "predictions": str(ws / "evaluations" / eval_id / "predictions.jsonl"),
            "metrics": result["metrics"]}
