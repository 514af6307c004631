"""`tuneloop data validate`: every line checked, too_long counted with the model's chat template."""

from __future__ import annotations

from pathlib import Path

from tuneloop import models
from tuneloop.core.formats import MAX_STORED_PROBLEMS, Example, Problem, Report, scan
from tuneloop.core.tokenize import encode


def validate(path: str | Path, task: str | None = None,
             model: str | None = "smollm2-135m-instruct") -> Report:
    """Scan a JSONL file; with a model, rows longer than its context are flagged too_long,
    and rows whose text holds one of its control-token strings get a warning (tuneloop
    tokenizes them as text, so they cannot open a turn; other tools may not)."""
    count_tokens, limit, on_example, warnings = None, None, None, []
    if model:
        tokenizer = models.load_tokenizer(model)
        limit = models.context_length(model)
        markers = sorted(t for t in tokenizer.all_special_tokens if len(t) > 1)

        def count_tokens(example: Example) -> int:
            return len(encode(tokenizer, list(example.messages), example.answer))

        def on_example(example: Example) -> None:
            texts = [m.get("content") or "" for m in example.messages] + [example.answer or ""]
            found = sorted({t for t in markers for text in texts if t in str(text)})
            if found and len(warnings) < MAX_STORED_PROBLEMS:
                warnings.append(Problem(example.line, "control_tokens", "holds the model's "
                                        "control-token text " + ", ".join(found) + "; it is "
                                        "read as text, never as a turn marker. Remove it if "
                                        "it came from a template or a log"))

    report = scan(path, task, count_tokens=count_tokens, max_tokens=limit, on_example=on_example)
    report.warnings = warnings + report.warnings
    return report
