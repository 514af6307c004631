"""Turn a recipe's data files into train / validation / test examples without leakage."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tuneloop import tasks
from tuneloop.core.formats import MIN_EXAMPLES, Example, load_examples
from tuneloop.errors import TuneloopError
from tuneloop.tasks import TaskInfo

VALIDATION_SHARE, VALIDATION_MAX = 0.1, 200


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    info: TaskInfo
    dropped_as_leaks: int


def key(example: Example) -> str:
    """What makes two examples the same input: the prompt text, case- and space-insensitive."""
    text = " ".join(m["content"] for m in example.messages)
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def load_splits(data, task: str, fields=None) -> Splits:
    """Load the files; drop train rows whose input also appears in test or validation.
    `fields`: an extraction recipe's field specs (else the fields come from the data)."""
    train = load_examples(data.train, task, min_examples=MIN_EXAMPLES)
    if len(train) < MIN_EXAMPLES:
        raise TuneloopError(f"{data.train}: {len(train)} examples; at least {MIN_EXAMPLES} needed")
    test = load_examples(data.test, task) if data.test else []
    held_out = {key(e) for e in test}
    if data.validation:
        validation = load_examples(data.validation, task)
    else:
        # A deterministic slice by content hash: the same file always gives the same split.
        n_val = min(VALIDATION_MAX, int(len(train) * VALIDATION_SHARE)) if len(train) >= 20 else 0
        ranked = sorted(train, key=key)
        val_keys = {key(e) for e in ranked[:n_val]}
        validation = [e for e in train if key(e) in val_keys]
        train = [e for e in train if key(e) not in val_keys]
    held_out |= {key(e) for e in validation}
    kept = [e for e in train if key(e) not in held_out]
    info = tasks.describe(task, kept, fields)
    if info.labels:  # a label set: a test label outside it can never be predicted
        unknown = sorted({e.label for e in test if e.label not in info.labels})
        if unknown:
            raise TuneloopError(f"{data.test}: label(s) {unknown[:5]} never occur in the training "
                                "data, so no model trained on it can predict them; add examples "
                                "of them to train or remove them from test")
    return Splits(kept, validation, test, info, len(train) - len(kept))
