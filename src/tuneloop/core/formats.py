"""Every accepted input row becomes one canonical `Example`; every problem gets a line and a code.

Accepted JSONL rows (one object per line):
  chat            {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
  prompt/completion {"prompt": "...", "completion": "..."}
  classification  {"text": "...", "label": "..."}
  extraction      {"text": "...", "fields": {...}}   (fields: {} is "nothing to extract")
  BIO-tagged      {"tokens": [...], "tags": ["B-person", "I-person", "O", ...]}  → extraction
                  rows whose fields are lists of the tagged spans, by type
  preference      {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}  (DPO)

The codes follow OpenAI's fine-tuning validator where one exists, so teams moving from its
hosted fine-tuning read the same words.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tuneloop.errors import TuneloopError

MAX_LINE_BYTES = 8 << 20  # a single row over 8 MiB is a broken export, not an example
MIN_EXAMPLES = 10  # OpenAI's minimum; fewer cannot teach a model a task
MAX_STORED_PROBLEMS = 1000  # past this only the counts per code grow, so memory stays flat
ROLES = {"system", "user", "assistant", "tool", "function"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}


@dataclass(frozen=True)
class Example:
    """One training or test example, whatever file format it came from."""

    messages: tuple[dict, ...]  # the conversation before the answer
    answer: str  # the assistant reply to learn or to match
    label: str | None = None  # classify: the gold label
    fields: dict | None = None  # extract: the gold fields
    text: str | None = None  # classify/extract: the raw input, for prompts built per task
    line: int = 0  # 1-based line in the source file
    rejected: str | None = None  # preference pairs: the reply not preferred (`answer` is chosen)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one line (line 0: the file as a whole)."""

    line: int
    code: str
    message: str


@dataclass
class Report:
    """The outcome of validating one file."""

    path: str
    rows: int = 0
    valid: int = 0
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # problems per code
    formats: dict[str, int] = field(default_factory=dict)  # valid rows per input format
    warnings: list[Problem] = field(default_factory=list)  # worth a look; the row stays valid

    @property
    def ok(self) -> bool:
        return not self.counts

    def add(self, problem: Problem) -> None:
        self.counts[problem.code] = self.counts.get(problem.code, 0) + 1
        if len(self.problems) < MAX_STORED_PROBLEMS:
            self.problems.append(problem)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "ok": self.ok, "rows": self.rows, "valid": self.valid,
            "formats": self.formats, "counts": self.counts,
            "problems": [p.__dict__ for p in self.problems],
            "problems_not_listed": sum(self.counts.values()) - len(self.problems),
            "warnings": [w.__dict__ for w in self.warnings],
        }


def read_lines(path: Path) -> Iterator[tuple[int, str | None, Problem | None]]:
    """(line number, text, problem) for each non-blank line, reading at most 8 MiB at a time."""
    with path.open("rb") as f:
        head = f.read(8192)
        if b"\x00" in head:
            yield 0, None, Problem(0, "not_utf8", f"{path} is a binary file, not UTF-8 JSON Lines "
                                   "text. Export the data as .jsonl (one JSON object per line).")
            return
        f.seek(0)
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES)
            if not raw:
                return
            number += 1
            if not raw.endswith(b"\n") and len(raw) == MAX_LINE_BYTES:
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # skip the remainder of the oversized line without keeping it
                yield number, None, Problem(number, "line_too_large",
                                            f"line is over {MAX_LINE_BYTES >> 20} MiB; "
                                            "split it or check the export for missing newlines")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, Problem(number, "not_utf8", f"line is not valid UTF-8 "
                                            f"(byte {exc.start}); re-export the file as UTF-8")
                continue
            if text.strip():
                yield number, text, None


def parse_row(obj: object, line: int, task: str | None) -> tuple[Example | None, str, list[Problem]]:
    """One decoded JSON value → (example or None, format name, problems)."""
    if not isinstance(obj, dict):
        return None, "", [Problem(line, "data_type", f"each line must be a JSON object, got "
                                  f"{type(obj).__name__}")]
    if "chosen" in obj or "rejected" in obj:
        return _parse_preference(obj, line)
    if "messages" in obj:
        return _parse_chat(obj, line)
    if "prompt" in obj or "completion" in obj:
        return _parse_prompt_completion(obj, line)
    if "tokens" in obj and "tags" in obj:
        return _parse_bio(obj, line)
    if "text" in obj:
        return _parse_text_row(obj, line, task)
    keys = ", ".join(sorted(obj)) or "none"
    return None, "", [Problem(line, "missing_messages_list", f"no `messages` list (keys: {keys}); "
                              "use {\"messages\": [...]}, {\"prompt\", \"completion\"}, "
                              "{\"text\", \"label\"} or {\"text\", \"fields\"}")]


def _parse_preference(obj: dict, line: int):
    """A preference pair: the conversation so far and two replies, the first one preferred."""
    problems = []
    for key, what in (("chosen", "preferred"), ("rejected", "not preferred")):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            problems.append(Problem(line, "missing_preference", f"`{key}` must be a non-empty "
                                    f"string: the {what} reply"))
    messages = prompt_messages(obj.get("prompt"))
    if not messages:
        problems.append(Problem(line, "invalid_prompt", "`prompt` must be a non-empty string or "
                                "a list of {\"role\", \"content\"} messages ending with a user turn"))
    if not problems and obj["chosen"].strip() == obj["rejected"].strip():
        problems.append(Problem(line, "identical_pair", "chosen and rejected are the same reply; "
                                "the pair teaches nothing"))
    if problems:
        return None, "preference", problems
    return (Example(messages=tuple(messages), answer=obj["chosen"].strip(),
                    rejected=obj["rejected"].strip(), line=line), "preference", [])


def _field_value(value) -> bool:
    """A string, a number, null, or a list of those (several values of one kind)."""
    scalar = (str, int, float, type(None))
    if isinstance(value, bool):
        return False
    if isinstance(value, list):
        return all(isinstance(v, scalar) and not isinstance(v, bool) for v in value)
    return isinstance(value, scalar)


def _parse_bio(obj: dict, line: int):
    """Token/tag rows (CoNLL-style BIO, as WNUT 2017 ships them) as extraction rows: each
    entity type a field holding the list of its spans' texts, in order; none: fields {}."""
    tokens, tags = obj["tokens"], obj["tags"]
    if (not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags)
            or not tokens or not all(isinstance(t, str) for t in tokens + tags)):
        return None, "bio", [Problem(line, "bad_bio", "`tokens` and `tags` must be lists of "
                                     "strings of the same, non-zero length")]
    fields: dict[str, list[str]] = {}
    span: list[str] = []
    kind = None
    for token, tag in [*zip(tokens, tags), ("", "O")]:
        inside = tag.startswith("I-") and kind == tag[2:]
        if span and not inside:  # the open span ends here
            fields.setdefault(kind, []).append(" ".join(span))
            span, kind = [], None
        if tag.startswith(("B-", "I-")) and not inside:  # (a stray I- opens a span, as seqeval)
            span, kind = [token], tag[2:]
        elif inside:
            span.append(token)
        elif tag != "O":
            return None, "bio", [Problem(line, "bad_bio", f"tag {tag!r} is not O, B-TYPE or "
                                         "I-TYPE")]
    text = obj.get("text") if isinstance(obj.get("text"), str) else " ".join(tokens)
    user = ({"role": "user", "content": text},)
    return (Example(user, json.dumps(fields, ensure_ascii=False), fields=fields, text=text,
                    line=line), "bio", [])


def prompt_messages(prompt) -> list[dict] | None:
    """Chat messages from a prompt: a message list, Anthropic-style "Human: ...\n\nAssistant:"
    transcript text, or plain text (one user turn)."""
    if isinstance(prompt, list):
        ok = all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                 for m in prompt)
        return [{"role": m["role"], "content": m["content"]} for m in prompt] if ok and prompt else None
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    text = prompt.strip()
    if not text.startswith("Human:"):
        return [{"role": "user", "content": text}]
    turns = []
    for part in re.split(r"\n\n(?=(?:Human|Assistant):)", text):
        speaker, _, content = part.partition(":")
        if content.strip():
            turns.append({"role": "user" if speaker == "Human" else "assistant",
                          "content": content.strip()})
    return turns if turns and turns[-1]["role"] == "user" else None


def _parse_chat(obj: dict, line: int):
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return None, "chat", [Problem(line, "missing_messages_list",
                                      "`messages` must be a non-empty list of {role, content}")]
    problems = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(line, "data_type", f"{where} must be an object"))
            continue
        for key in ("role", "content"):
            if key not in msg:
                problems.append(Problem(line, "message_missing_key", f"{where} has no `{key}`"))
        extra = sorted(set(msg) - MESSAGE_KEYS)
        if extra:
            problems.append(Problem(line, "message_unrecognized_key",
                                    f"{where} has unrecognized key(s) {extra}; allowed: "
                                    "role, content, name, weight"))
        if "role" in msg and msg["role"] not in ROLES:
            problems.append(Problem(line, "unrecognized_role", f"{where}.role is {msg['role']!r}; "
                                    "use system, user or assistant"))
        if "content" in msg and (not isinstance(msg["content"], str) or not msg["content"].strip()):
            problems.append(Problem(line, "missing_content",
                                    f"{where}.content must be a non-empty string"))
    if problems:
        return None, "chat", problems
    if not any(m["role"] == "assistant" for m in messages):
        return None, "chat", [Problem(line, "example_missing_assistant_message",
                                      "no assistant message: add the reply the model should learn")]
    if messages[-1]["role"] != "assistant":
        return None, "chat", [Problem(line, "example_missing_assistant_message",
                                      "the last message must be the assistant's reply to learn")]
    turns = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return Example(turns, messages[-1]["content"], line=line), "chat", []


def _parse_prompt_completion(obj: dict, line: int):
    problems = []
    for key in ("prompt", "completion"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(Problem(line, "missing_content", f"`{key}` must be a non-empty string"))
    if problems:
        return None, "prompt_completion", problems
    msgs = ({"role": "user", "content": obj["prompt"]},)
    return Example(msgs, obj["completion"], line=line), "prompt_completion", []


def _parse_text_row(obj: dict, line: int, task: str | None):
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        return None, "", [Problem(line, "missing_content", "`text` must be a non-empty string")]
    user = ({"role": "user", "content": text},)
    if "fields" in obj or task == "extract":
        fields = obj.get("fields")
        if not isinstance(fields, dict):
            return None, "extraction", [Problem(line, "missing_fields", "`fields` must be an "
                                                "object of field name → value ({} when the text "
                                                "holds none of them)")]
        problems = [Problem(line, "bad_field_value", f"fields.{name} is {type(value).__name__}; "
                            "a value is a string, a number, null or a list of those")
                    for name, value in fields.items() if not _field_value(value)]
        if problems:
            return None, "extraction", problems
        answer = json.dumps(fields, ensure_ascii=False)
        return Example(user, answer, fields=fields, text=text, line=line), "extraction", []
    label = obj.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        return None, "classification", [Problem(line, "missing_label",
                                                "`label` must be a non-empty string")]
    return Example(user, label, label=label, text=text, line=line), "classification", []


def scan(path: str | Path, task: str | None = None,
         count_tokens: Callable[[Example], int] | None = None, max_tokens: int | None = None,
         on_example: Callable[[Example], None] | None = None) -> Report:
    """Check every line of a JSONL file, streaming; hand each valid example to `on_example`.

    `count_tokens` (chat template included) and `max_tokens` enable the `too_long` check.
    """
    path = Path(path)
    report = Report(str(path))
    empty_extractions = 0
    if not path.is_file():
        raise TuneloopError(f"{path}: no such file")
    if path.stat().st_size == 0:
        report.add(Problem(0, "empty_file", f"{path} is empty; it needs at least {MIN_EXAMPLES} "
                           "examples, one JSON object per line"))
        return report
    for number, text, problem in read_lines(path):
        if problem is not None:
            report.add(problem)
            if number == 0:
                return report
            report.rows += 1
            continue
        report.rows += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add(Problem(number, "invalid_json", f"not valid JSON: {exc.msg} at column "
                               f"{exc.colno}"))
            continue
        example, fmt, problems = parse_row(obj, number, task)
        if example is not None and count_tokens and max_tokens:
            # Every token is at least one byte, so short rows cannot be too long: skip tokenizing.
            if len(text.encode()) + 64 > max_tokens and (n := count_tokens(example)) > max_tokens:
                problems = [Problem(number, "too_long", f"{n} tokens with the chat template; "
                                    f"the model's context is {max_tokens}. Shorten or split it")]
        for p in problems:
            report.add(p)
        if example is not None and not problems:
            report.valid += 1
            report.formats[fmt] = report.formats.get(fmt, 0) + 1
            empty_extractions += example.fields == {}
            if on_example:
                on_example(example)
    if report.rows == 0:
        report.add(Problem(0, "empty_file", f"{path} has no rows; it needs at least "
                           f"{MIN_EXAMPLES} examples, one JSON object per line"))
    elif report.valid < MIN_EXAMPLES:
        report.add(Problem(0, "too_few_examples", f"{report.valid} valid examples; at least "
                           f"{MIN_EXAMPLES} are needed to fine-tune"))
    if report.valid and empty_extractions == report.valid:
        report.warnings.append(Problem(0, "nothing_to_extract", f"all {report.valid} rows have "
                                       "empty fields: a model trained on them only learns to "
                                       "answer that nothing is there"))
    return report


def load_examples(path: str | Path, task: str | None = None, min_examples: int = 1) -> list[Example]:
    """All examples of a file, or a TuneloopError that lists the first problems."""
    examples: list[Example] = []
    report = scan(path, task, on_example=examples.append)
    counts = {c: n for c, n in report.counts.items()
              if not (c == "too_few_examples" and report.valid >= min_examples)}
    if counts:
        first = "\n".join(f"  line {p.line}: {p.code}: {p.message}" for p in report.problems[:10]
                          if p.code in counts)
        raise TuneloopError(f"{path} has {sum(counts.values())} problem(s):\n{first}\n"
                            f"Run `tuneloop data validate {path}` for the full list.")
    return examples


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, read in 1 MiB chunks: the identity of a dataset version."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
