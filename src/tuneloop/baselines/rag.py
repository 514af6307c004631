"""Retrieval-augmented prompts: passages from a document collection, chosen per test row.

The collection is the recipe's `data.documents`: a folder of .txt/.md files, or a JSONL file
with one document per line ({"text": ..., "title": ...}). Documents are cut into passages of
about `PASSAGE_WORDS` words at paragraph boundaries; each test row's user turns are embedded
with MiniLM and its nearest passages go into the system message, above the question.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tuneloop.tasks.prompts import count, prefix_messages
from tuneloop.errors import TuneloopError

PASSAGE_WORDS = 120
SUFFIXES = (".txt", ".md")
INSTRUCTION = ("Answer the user's question using the reference passages below. "
               "If they do not hold the answer, say so briefly.")


@dataclass(frozen=True)
class Passage:
    source: str  # file name or "file:line", plus the passage number
    text: str


def load_passages(path: Path, words: int = PASSAGE_WORDS) -> list[Passage]:
    """Every passage of the collection, in a stable order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise TuneloopError(f"{path}: no .txt or .md documents in this folder")
        docs = [(str(f.relative_to(path)), _read(f)) for f in files]
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        docs = list(_jsonl_documents(path))
    elif path.is_file() and path.suffix.lower() in SUFFIXES:
        docs = [(path.name, _read(path))]
    else:
        raise TuneloopError(f"{path}: documents must be a folder of .txt/.md files or a .jsonl "
                            "file with a \"text\" field per line")
    passages = [Passage(f"{name}#{i + 1}", chunk)
                for name, text in docs for i, chunk in enumerate(chunks(text, words))]
    if not passages:
        raise TuneloopError(f"{path}: the documents hold no text")
    return passages


def collection_sha256(passages: list[Passage]) -> str:
    """Identifies the collection as retrieved from, so cached RAG scores follow its edits."""
    digest = hashlib.sha256()
    for p in passages:
        digest.update(f"{p.source}\0{p.text}\0".encode())
    return digest.hexdigest()


def chunks(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Paragraphs packed into passages of at most `words` words; a longer paragraph is cut
    into pieces of `words` words."""
    out: list[str] = []
    current: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        tokens = para.split()
        while len(tokens) > words:
            if current:
                out.append(" ".join(current))
                current = []
            out.append(" ".join(tokens[:words]))
            tokens = tokens[words:]
        if current and len(current) + len(tokens) > words:
            out.append(" ".join(current))
            current = []
        current += tokens
    if current:
        out.append(" ".join(current))
    return out


def retrieve(queries: list[str], passages: list[Passage], k: int) -> list[list[Passage]]:
    """The k passages most similar to each query, most similar first."""
    from tuneloop.models.embed import nearest

    ranked = nearest(queries, [p.text for p in passages], k)
    return [[passages[i] for i in row] for row in ranked]


def prompt(example, found: list[Passage], info) -> list[dict]:
    """The task's zero-shot instruction (or the example's own system message), the passages,
    then the example's user turns."""
    head = prefix_messages(info, [])
    system = next((m["content"] for m in [*head, *example.messages] if m["role"] == "system"), "")
    context = "\n\n".join(f"[{i + 1}] ({p.source}) {p.text}" for i, p in enumerate(found))
    content = f"{system}\n\n{INSTRUCTION}".strip() + f"\n\nReference passages:\n{context}"
    return [{"role": "system", "content": content},
            *[m for m in example.messages if m["role"] != "system"]]


def fitted_prompt(tokenizer, example, found: list[Passage], info, budget: int) -> list[dict]:
    """`prompt` with the least similar passages dropped until its system message fits `budget`
    tokens (the budget excludes the row's own turns and the reply)."""
    found = list(found)
    while True:
        messages = prompt(example, found, info)
        if not found or count(tokenizer, messages[:1]) <= budget:
            return messages
        found.pop()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TuneloopError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _jsonl_documents(path: Path):
    for n, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TuneloopError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise TuneloopError(f"{path} line {n}: each line needs a \"text\" string field")
        title = row.get("title")
        yield (f"{title or path.name}:{n}", f"{title}\n\n{row['text']}" if title else row["text"])
