"""`tuneloop data validate`: every line checked, too_long counted with the model's chat template."""

from __future__ import annotations

from pathlib import Path

from tuneloop import models
from tuneloop.data.formats import Example, Report, scan
from tuneloop.data.tokenize import encode


def validate(path: str | Path, task: str | None = None,
             model: str | None = "smollm2-135m-instruct") -> Report:
    """Scan a JSONL file; with a model, rows longer than its context are flagged too_long."""
    count_tokens, limit = None, None
    if model:
        tokenizer = models.load_tokenizer(model)
        limit = models.context_length(model)

        def count_tokens(example: Example) -> int:
            return len(encode(tokenizer, list(example.messages), example.answer))

    return scan(path, task, count_tokens=count_tokens, max_tokens=limit)
