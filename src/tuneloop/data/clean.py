"""Cleaning: Unicode normalization, and the examples not worth training on.

Normalization is conservative, because replies may be code: NFC, line ends to \\n, invisible
control characters removed (zero-width joiners stay: emoji sequences need them), exotic spaces
to plain ones, trailing spaces cut, runs of blank lines shortened. Indentation is kept.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from tuneloop.data.rows import get_path, prompt_text, reply_text, set_path, text_paths

# C0 and C1 controls except tab and newline, zero-width space, word joiner, byte-order mark.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    if text.isascii() and text.isprintable() and text == text.strip():
        return text  # the common case costs one scan
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", _INVISIBLE.sub("", text))
    return _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip()


_NOT_WORD = re.compile(r"[^\w\s]")


def _drop_punctuation(match: re.Match) -> str:
    return " " if unicodedata.category(match.group())[0] == "P" else match.group()


def match_key(text: str) -> str:
    """Text as compared for duplicates: case, width, punctuation and spacing ignored; letters of
    every script, digits and symbols (emoji) kept."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub(_drop_punctuation, text).split())


def collapse_repeats(text: str) -> str:
    """Consecutive identical lines (and paragraphs) kept once: an export or copy-paste stutter."""
    for sep in ("\n\n", "\n"):
        parts = text.split(sep)
        if len(parts) > 1:
            kept = [p for i, p in enumerate(parts) if i == 0 or not p.strip() or p != parts[i - 1]]
            text = sep.join(kept)
    return text


def repeated_fraction(text: str) -> float:
    """The share of non-empty lines that repeat an earlier line (Gopher's quality signal)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 4:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


@dataclass
class CleanSettings:
    normalize: bool = True
    collapse_repeats: bool = True
    min_chars: int = 2
    max_chars: int = 100_000
    max_repeated_fraction: float = 0.3
    drop_empty_reply: bool = True
    drop_echo: bool = True


def clean_row(row: dict, s: CleanSettings) -> tuple[dict, str | None, bool]:
    """(cleaned row, reason it is dropped or None, whether any text changed)."""
    changed = False
    if s.normalize or s.collapse_repeats:
        for path in text_paths(row):
            value = get_path(row, path)
            new = normalize(value) if s.normalize else value
            if s.collapse_repeats and "\n" in new:
                new = collapse_repeats(new)
            if new != value:
                set_path(row, path, new)
                changed = True
    prompt, reply = prompt_text(row), reply_text(row)
    size = len(prompt) + len(reply or "")
    if len(prompt.strip()) < s.min_chars:
        return row, "too_short", changed
    if size > s.max_chars:
        return row, "too_long", changed
    if s.max_repeated_fraction < 1 and max(repeated_fraction(prompt), repeated_fraction(
            reply or "")) > s.max_repeated_fraction:
        return row, "repeated_lines", changed
    if reply is not None:
        if s.drop_empty_reply and not reply.strip():
            return row, "empty_reply", changed
        if s.drop_echo and match_key(reply) == match_key(prompt):
            return row, "reply_repeats_prompt", changed
    return row, None, changed
