"""Task kinds: how a task builds prompts, reads the model's output and scores it.

Each kind is one module that answers the same questions (the protocol below); `TASKS` is the
explicit registry, and every caller asks the kind's module instead of testing its name.

A task module holds:
    HEADLINE, COLUMNS, ROW_HEADLINE   the metric that decides, the terminal's columns, and
                                      the per-row metric `compare` averages
    PAIRED_EXACT, REFERENCE_LOSS      compare adds McNemar's test; the runner adds the
                                      references' perplexity
    describe(examples, fields)        the TaskInfo learned from the training rows
    prompt(example, info, zero_shot)  the messages; target(example, info): the reply to learn
    gold(example, info)               what a prediction is scored against
    parse(output, info)               (prediction, valid)
    metrics(preds, golds, valid, examples)
    row_score(row), value_counts_table(rows), shared_extras(rows)   for intervals and compare
    max_new_tokens(tokenizer, examples, info), grammar(model, tokenizer, info),
    answer_schema(info), decide(...)  how answers are decoded (decide: chosen among a set)
    value_confidences(rows)           (each predicted value's confidence, whether it is
                                      right) where rows carry them, else None
    with_answer(example, reply, info) the example as a teacher answered it (synth, distill)
    shot_order(candidates, seed)      the order in-context examples are drawn in
"""

from __future__ import annotations

from tuneloop.tasks import chat, classify, extract
from tuneloop.tasks.info import TaskInfo

__all__ = ["TASKS", "TaskInfo", "describe", "headline", "module"]

TASKS = {"classify": classify, "extract": extract, "chat": chat}


def module(kind: str):
    """The task module of `kind`; a clear error for a kind no module answers."""
    try:
        return TASKS[kind]
    except KeyError:
        from tuneloop.errors import TuneloopError

        raise TuneloopError(f"unknown task {kind!r}; use one of: {', '.join(TASKS)}") from None


def headline(kind: str) -> str:
    """The metric that decides for a task kind."""
    return module(kind).HEADLINE


def describe(kind: str, examples, fields=None) -> TaskInfo:
    """The TaskInfo of a kind, derived from its training examples; for extraction the recipe's
    `fields` (name, type, description), when given, name the fields instead of the data."""
    return module(kind).describe(examples, fields)
