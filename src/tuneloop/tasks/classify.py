"""classify: one label per input; the output is mapped to the nearest known label."""

from __future__ import annotations

import difflib
import re

SYSTEM = "Classify the user's message. Reply with the label only."
# A trained model needs no instruction, only a system turn of its own: without one, chat
# templates such as SmolLM2's insert a default system prompt (20 tokens). "Classify." costs 3;
# the whole banking77 prompt falls from 45 tokens to 34 (tests/test_labels.py counts them).
TRAINED_SYSTEM = "Classify."


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The messages for one example. Zero-shot prompts instruct and list the labels; trained
    ones carry the short system turn the model learned with."""
    if zero_shot:
        system = SYSTEM + " Labels: " + ", ".join(info.labels) + "."
    else:  # what the model learned with (an artifact records it: tasks.TaskInfo.system)
        system = (info.system if info else None) or TRAINED_SYSTEM
    return [{"role": "system", "content": system}, *example.messages]


def target(example, info=None) -> str:
    """The reply the model should produce."""
    return example.label or example.answer


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "_", s.strip().strip(".\"'`").lower())


def parse(output: str, info) -> tuple[str, bool]:
    """(label, exact): the known label the output names, and whether it named one exactly."""
    by_norm = {_norm(label): label for label in info.labels}
    first_line = output.strip().splitlines()[0] if output.strip() else ""
    key = _norm(first_line)
    if key in by_norm:
        return by_norm[key], True
    for norm, label in sorted(by_norm.items(), key=lambda kv: -len(kv[0])):
        if norm in _norm(output):
            return label, False
    close = difflib.get_close_matches(key, list(by_norm), n=1, cutoff=0.0)
    return (by_norm[close[0]] if close else ""), False


def metrics(predictions: list[str], golds: list[str], exact: list[bool]) -> dict:
    """Accuracy, macro precision/recall/F1 over the gold label set, and the confusion matrix."""
    n = len(golds)
    labels = sorted(set(golds))
    confusion: dict[str, dict[str, int]] = {g: {} for g in labels}
    for p, g in zip(predictions, golds):
        confusion[g][p] = confusion[g].get(p, 0) + 1
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = confusion[label].get(label, 0)
        predicted = sum(1 for p in predictions if p == label)
        actual = sum(confusion[label].values())
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    k = len(labels) or 1
    return {
        "accuracy": sum(p == g for p, g in zip(predictions, golds)) / n if n else 0.0,
        "macro_precision": sum(precisions) / k,
        "macro_recall": sum(recalls) / k,
        "macro_f1": sum(f1s) / k,
        "exact_label_rate": sum(exact) / n if n else 0.0,
        "n": n,
        "confusion": confusion,
    }
