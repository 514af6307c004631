"""Prompt assembly: a shared prefix of instruction and in-context examples ("shots") before
each row's own turns, split into token ids so the prefix's KV cache is computed once.

Both the prompting baselines (which choose the shots) and the evaluation runner (which scores
them) lay prompts out here.
"""

from __future__ import annotations

from tuneloop import tasks
from tuneloop.core.formats import Example
from tuneloop.core.tokenize import render_ids


def turns(example: Example, info) -> list[dict]:
    """One shot as chat turns: its user turn(s) and the answer as the assistant's reply."""
    module = tasks.module(info.kind)
    user = [m for m in example.messages if m["role"] != "system"]
    return [*user, {"role": "assistant", "content": module.target(example, info)}]


def prefix_messages(info, shots: list[Example]) -> list[dict]:
    """The shared prefix: the zero-shot instruction, then every shot."""
    module = tasks.module(info.kind)
    head = module.prompt(Example(messages=(), answer=""), info, zero_shot=True)
    return [*head, *[t for shot in shots for t in turns(shot, info)]]


def split_prompts(tokenizer, prefix: list[dict], examples: list[Example]
                  ) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, suffix ids per example) of prefix + each example's turns, as the chat
    template renders them (contents tokenized as text: core.tokenize.render_ids).

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
