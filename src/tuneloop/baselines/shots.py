"""In-context examples ("shots"): which training rows go into the prompt, and how they are laid out.

Shots form one shared prefix for every test row (system instruction, then user/assistant
turns), so its KV cache can be computed once. Training rows whose input also appears in the
test set never become shots: a test row must not see its own answer.
"""

from __future__ import annotations

import random

from tuneloop import tasks
from tuneloop.data.formats import Example
from tuneloop.data.tokenize import render_ids
from tuneloop.train.data import key


def pool(train: list[Example], test: list[Example]) -> list[Example]:
    """Training rows allowed as shots: none shares its input with a test row."""
    banned = {key(e) for e in test}
    return [e for e in train if key(e) not in banned]


def ordered(candidates: list[Example], info, seed: int) -> list[Example]:
    """A seeded order that cycles through the labels, so any first k shots cover them evenly."""
    rng = random.Random(seed)
    shuffled = candidates[:]
    rng.shuffle(shuffled)
    if info.kind != "classify":
        return shuffled
    by_label: dict[str, list[Example]] = {}
    for e in shuffled:
        by_label.setdefault(e.label, []).append(e)
    out: list[Example] = []
    while any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label]:
                out.append(by_label[label].pop())
    return out


def turns(example: Example, info) -> list[dict]:
    """One shot as chat turns: its user turn(s) and the answer as the assistant's reply."""
    module = tasks.TASKS[info.kind]
    user = [m for m in example.messages if m["role"] != "system"]
    return [*user, {"role": "assistant", "content": module.target(example, info)}]


def prefix_messages(info, shots: list[Example]) -> list[dict]:
    """The shared prefix: the zero-shot instruction, then every shot."""
    module = tasks.TASKS[info.kind]
    head = module.prompt(Example(messages=(), answer=""), info, zero_shot=True)
    return [*head, *[t for shot in shots for t in turns(shot, info)]]


def split_prompts(tokenizer, prefix: list[dict], examples: list[Example]
                  ) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, suffix ids per example) of prefix + each example's turns, as the chat
    template renders them (contents tokenized as text: data.tokenize.render_ids).

    The template renders the prefix unchanged when turns are appended, and a turn starts
    with a special token, so the token boundary falls exactly between prefix and suffix.
    """
    prefix_ids = render_ids(tokenizer, prefix) if prefix else []
    suffixes = []
    for example in examples:
        user = [m for m in example.messages if m["role"] != "system"]
        full = render_ids(tokenizer, [*prefix, *user], add_generation_prompt=True)
        if full[:len(prefix_ids)] != prefix_ids:
            raise ValueError("the chat template does not render the shared prefix unchanged")
        suffixes.append(full[len(prefix_ids):])
    return prefix_ids, suffixes


def split_prompt(tokenizer, prefix: list[dict], example: Example) -> tuple[list[int], list[int]]:
    """`split_prompts` for one example."""
    prefix_ids, (suffix,) = split_prompts(tokenizer, prefix, [example])
    return prefix_ids, suffix


def count(tokenizer, messages: list[dict]) -> int:
    """Tokens of messages rendered by the chat template (no generation prompt)."""
    if not messages:
        return 0
    return len(render_ids(tokenizer, messages))


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
