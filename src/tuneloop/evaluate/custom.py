"""Custom evaluators: business checks scored on every test answer, by name.

An evaluator is a function `(example, prediction) -> dict[str, float | bool]`: `example` is the
test row (`tuneloop.core.formats.Example`: messages, answer, label, fields, text, line) and
`prediction` the evaluated row ({"output", "prediction", "gold", "line"}). The run reports the
mean of each returned value over the test rows. A recipe names evaluators in `evaluators:`:
a built-in name, `package.module:function`, or `path/to/file.py:function` (relative to the
recipe). Register more with `@tuneloop.evaluate.custom.register("name")`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

from tuneloop.errors import TuneloopError

Evaluator = Callable[[object, dict], dict]
REGISTRY: dict[str, Evaluator] = {}


def register(name: str):
    def wrap(fn: Evaluator) -> Evaluator:
        REGISTRY[name] = fn
        return fn
    return wrap


@register("answer_length")
def answer_length(example, prediction: dict) -> dict:
    """Characters and words of the raw answer (are replies getting long?)."""
    text = prediction["output"].strip()
    return {"chars": len(text), "words": len(text.split())}


@register("json_object")
def json_object(example, prediction: dict) -> dict:
    """Is the whole answer one JSON object (nothing before or after)?"""
    try:
        return {"valid": isinstance(json.loads(prediction["output"].strip()), dict)}
    except json.JSONDecodeError:
        return {"valid": False}


def resolve(name: str, base: Path | None = None) -> Evaluator:
    """A registered name, `module:function` or `file.py:function`."""
    if name in REGISTRY:
        return REGISTRY[name]
    target, _, attr = name.partition(":")
    if not attr:
        raise TuneloopError(f"evaluator '{name}': not a built-in ({', '.join(sorted(REGISTRY))}); "
                            "name a function as package.module:function or file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target) if Path(target).is_absolute() or base is None else base / target
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, FileNotFoundError) as exc:
        raise TuneloopError(f"evaluator '{name}': cannot load {target} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TuneloopError(f"evaluator '{name}': {target} has no function {attr}")
    return fn


def apply(names: list[str], examples, predictions: list[dict], base: Path | None = None) -> dict:
    """{evaluator: {value: mean over rows}}; a failing evaluator names itself and the row."""
    by_line = {e.line: e for e in examples}
    out = {}
    for name in names:
        fn = resolve(name, base)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for row in predictions:
            try:
                values = fn(by_line[row["line"]], row)
            except Exception as exc:  # the user's code: say where it failed
                raise TuneloopError(f"evaluator '{name}' failed on test line {row['line']}: "
                                    f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(values, dict):
                raise TuneloopError(f"evaluator '{name}' returned {type(values).__name__} on "
                                    f"test line {row['line']}; return a dict of numbers")
            for key, value in values.items():
                if isinstance(value, (bool, int, float)) and not (
                        isinstance(value, float) and math.isnan(value)):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
        out[name] = {k: sums[k] / counts[k] for k in sums}
    return out
