"""A model to use by name: a finished run's artifact with the task it was trained for, or a
base model. Evaluation, synthesis teachers and distillation teachers load models here."""

from __future__ import annotations

from pathlib import Path

from tuneloop import models
from tuneloop.errors import TuneloopError
from tuneloop.models import load_artifact
from tuneloop.store import Registry
from tuneloop.tasks import TaskInfo


def load_for_eval(model: str, registry: Registry):
    """(model, tokenizer, TaskInfo or None, run or None): a run's adapter on its base, or a base."""
    run = registry.get_run(model) if model.startswith("run-") else None
    if run is None:
        return models.load_model(model), models.load_tokenizer(model), None, None
    if run.status != "done" or not run.adapter_path:
        raise TuneloopError(f"run {run.id} is {run.status}; only finished runs can be evaluated")
    lm, meta = load_artifact(Path(run.adapter_path))
    return lm, models.load_tokenizer(meta["base_model"]), TaskInfo.from_dict(meta["task"]), run


def load_for_answers(model: str, registry: Registry):
    """load_for_eval for a model whose written answers are used (a synth or distillation
    teacher): a run that decides with a label head (models/head.py) or finds its values with a
    span head (models/spans.py) writes none."""
    from tuneloop.models import head, spans

    loaded = load_for_eval(model, registry)
    for found, what in ((head.find, "decides its labels with a label head"),
                        (spans.find, "finds its values with a span head")):
        if found(loaded[0]) is not None:
            raise TuneloopError(f"run {model} {what} and was not trained to write its answers; "
                                "as a teacher use a run trained with head: none, or a base "
                                "model")
    return loaded
