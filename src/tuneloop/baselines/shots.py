"""In-context examples ("shots"): which training rows go into the prompt (tasks/prompts.py
lays them out).

Shots form one shared prefix for every test row (system instruction, then user/assistant
turns), so its KV cache can be computed once. Training rows whose input also appears in the
test set never become shots: a test row must not see its own answer.
"""

from __future__ import annotations

from tuneloop import tasks
from tuneloop.core.formats import Example
from tuneloop.tasks.prompts import count, prefix_messages
from tuneloop.data.splits import key


def pool(train: list[Example], test: list[Example]) -> list[Example]:
    """Training rows allowed as shots: none shares its input with a test row."""
    banned = {key(e) for e in test}
    return [e for e in train if key(e) not in banned]


def ordered(candidates: list[Example], info, seed: int) -> list[Example]:
    """A seeded order, as the task draws its shots (a classifier cycles through its labels, so
    any first k shots cover them evenly)."""
    return tasks.module(info.kind).shot_order(candidates, seed)


def fit(tokenizer, info, candidates: list[Example], budget: int, limit: int | None = None) -> list[Example]:
    """As many shots (in order) as fit within `budget` prefix tokens, and at most `limit`.

    Each candidate is measured by rendering the whole prefix with it: templates differ in
    what a turn costs (Gemma's folds the system message into the first user turn), so the
    cost of a shot is not known apart from the shots before it.
    """
    head = prefix_messages(info, [])
    if count(tokenizer, head) > budget:
        return []
    chosen: list[Example] = []
    for shot in candidates:
        if limit is not None and len(chosen) >= limit:
            break
        if count(tokenizer, prefix_messages(info, [*chosen, shot])) > budget:
            break
        chosen.append(shot)
    return chosen
