"""Where the text is in a row of any accepted format (see formats.py), and how to reach it.

Curation steps (cleaning, deduplication, anonymization) act on the rows as the user wrote them,
so the prepared files keep their format; these helpers find the prompt, the reply and every
string worth scanning without caring which format a row has.
"""

from __future__ import annotations

from typing import Iterable


def text_paths(row: dict, fields: Iterable[str] | None = None) -> list[tuple]:
    """Paths to the string values of a row: under the named top-level fields, or all of them
    except vocabulary (a classification label, message roles and names)."""
    paths: list[tuple] = []

    def walk(value, path):
        if isinstance(value, str):
            paths.append(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, path + (i,))

    wanted = set(fields) if fields else None
    for key, value in row.items():
        if wanted is None or key in wanted:
            walk(value, (key,))
    if wanted is None:
        paths = [p for p in paths if p != ("label",) and not (
            p[0] in ("messages", "prompt") and p[-1] in ("role", "name", "tool_call_id"))]
    return paths


def get_path(row, path):
    for key in path:
        row = row[key]
    return row


def set_path(row, path, value) -> None:
    for key in path[:-1]:
        row = row[key]
    row[path[-1]] = value


def _contents(messages) -> str:
    return "\n".join(m.get("content") or "" for m in messages if isinstance(m, dict)
                     and isinstance(m.get("content"), str))


def prompt_text(row: dict) -> str:
    """What the model is given: the input text, or the conversation before the reply."""
    if isinstance(row.get("messages"), list):
        return _contents(row["messages"][:-1])
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _contents(prompt)
    if isinstance(prompt, str):
        return prompt
    text = row.get("text")
    return text if isinstance(text, str) else ""


def reply_text(row: dict) -> str | None:
    """The reply to learn, where the row has one written out (not a label or fields)."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        last = row["messages"][-1]
        return last.get("content") if isinstance(last, dict) else None
    for key in ("completion", "chosen"):
        if key in row:
            return row[key] if isinstance(row[key], str) else ""
    return None
