"""The reference pages and the commands agree: every command and every option a `--help`
shows is named in docs/ (or the README), and every `tuneloop ...` command the pages name
exists. A new option without its documentation, or a page about a command that is gone,
fails here."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from tuneloop.cli import app

ROOT = Path(__file__).resolve().parents[1]


def pages() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def commands(group, path: tuple = ()) -> dict:
    """Every command by its words after `tuneloop` (groups included)."""
    found = {path: group}
    for name, sub in getattr(group, "commands", {}).items():
        if not sub.hidden:
            found.update(commands(sub, path + (name,)))
    return found


ALL = commands(typer.main.get_command(app))


def test_every_command_and_option_is_documented():
    text = pages()
    missing = []
    for words, command in ALL.items():
        if words and f"tuneloop {' '.join(words)}" not in text:
            missing.append(f"command `tuneloop {' '.join(words)}`")
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                names = [o for o in param.opts + param.secondary_opts
                         if o.startswith("--") and o != "--help"]
                if names and not any(re.search(re.escape(n) + r"(?![\w-])", text) for n in names):
                    missing.append(f"`tuneloop {' '.join(words)} {names[0]}`")
    assert not missing, "not in README.md or docs/: " + ", ".join(missing)


def test_every_command_the_pages_name_exists():
    named = set(re.findall(r"`tuneloop ((?:[a-z][a-z0-9-]* ?)+)", pages()))
    unknown = []
    for phrase in named:
        words = tuple(phrase.split())
        # the longest prefix that is a command; what follows must be its arguments
        while words and words not in ALL:
            words = words[:-1]
        if not words:
            unknown.append(phrase.strip())
    assert not unknown, f"the pages name commands that do not exist: {sorted(unknown)}"
