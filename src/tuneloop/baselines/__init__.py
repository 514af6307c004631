"""Prompting baselines: what the base model does without fine-tuning, scored like a run.

`STRATEGIES` maps a strategy name to a function; fine-tuning is worth it only where a run
beats the best of them.
"""

from __future__ import annotations

from pathlib import Path

from tuneloop.evaluate import evaluate


def zero_shot(base_model: str, train: Path, test: Path, task: str, **kwargs) -> dict:
    """The base model with an instruction naming the label set / fields from the training data."""
    return evaluate(base_model, test, task=task, labels_from=train, strategy="zero-shot", **kwargs)


STRATEGIES = {"zero-shot": zero_shot}
