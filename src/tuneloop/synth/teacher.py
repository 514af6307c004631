"""Teachers: the models that write synthetic data, behind one interface, with a request cache.

A teacher is an OpenAI-compatible chat endpoint (tuneloop's own server, llama.cpp, vLLM or a
hosted API) or a local model: a finished run's adapter or a catalog model. Every request is
keyed by a hash of (teacher, messages, sampling) and its reply stored in an SQLite file as
soon as it arrives, so an interrupted generation resumes without asking (or paying) twice.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
import hashlib
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tuneloop.errors import TuneloopError


@dataclass(frozen=True)
class Ask:
    """One request: chat messages and how to sample (temperature 0: greedy)."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable
    temperature: float = 0.0
    max_tokens: int = 256
    sample: int = 0  # the n-th sample of the same prompt (its seed)

    @classmethod
    def of(cls, messages: list[dict], **kw) -> "Ask":
        return cls(tuple((m["role"], m["content"]) for m in messages), **kw)

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # stopped by max_tokens, not by the model


@dataclass
class Usage:
    """What a generation asked for: requests sent, answered from the cache, failed; tokens."""

    requests: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"requests": self.requests, "cached": self.cached, "failed": self.failed,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "errors": self.errors[:5]}


class Cache:
    """Replies by request hash in one SQLite file; each reply is committed as it arrives."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT "
                        "NOT NULL, created TEXT NOT NULL)")
        self.db.commit()

    def get(self, key: str) -> Reply | None:
        row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return Reply(**json.loads(row[0])) if row else None

    def put(self, key: str, reply: Reply) -> None:
        self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)",
                        (key, json.dumps(reply.__dict__),
                         dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def request_cache_path(workspace: Path) -> Path:
    """The workspace's one cache of teacher and judge replies."""
    return workspace / "cache" / "requests.sqlite"


class Teacher(ABC):
    """Answers Asks. Subclasses implement `answer`, yielding (index, Reply or error) pairs."""

    id: str = ""  # identifies the teacher in cache keys and lineage
    terms: str | None = None  # the licence/terms its outputs are under
    trained_for: object = None  # TaskInfo when the teacher is a run fine-tuned on the task

    @abstractmethod
    def answer(self, asks: list[Ask]) -> Iterator[tuple[int, Reply | Exception]]:
        """(index into `asks`, its Reply or the error that remained after retries), in any
        order."""

    def describe(self) -> dict:
        return {"id": self.id, "terms": self.terms}

    def key(self, ask: Ask) -> str:
        body = json.dumps([self.id, ask.messages, ask.temperature, ask.max_tokens, ask.sample])
        return hashlib.sha256(body.encode()).hexdigest()


def ask_all(teacher: Teacher, asks: list[Ask], cache: Cache, usage: Usage,
            progress=None) -> list[Reply | None]:
    """Every Ask's reply: from the cache, else from the teacher (and then cached at once).

    A request that still fails after the teacher's retries is None (counted in usage);
    duplicates within `asks` are asked once.
    """
    keys = [teacher.key(a) for a in asks]
    replies: list[Reply | None] = [None] * len(asks)
    pending: dict[str, list[int]] = {}  # key -> the rows that asked it
    cached: dict[str, Reply | None] = {}
    for i, key in enumerate(keys):
        if key not in cached:
            cached[key] = cache.get(key)
            if cached[key] is not None:
                usage.cached += 1
        if cached[key] is not None:
            replies[i] = cached[key]
        else:
            pending.setdefault(key, []).append(i)
    order = list(pending)
    done = 0
    for n, result in teacher.answer([asks[pending[k][0]] for k in order]):
        key = order[n]
        done += 1
        if isinstance(result, Exception):
            usage.failed += 1
            usage.errors.append(f"{type(result).__name__}: {result}"[:300])
        else:
            usage.requests += 1
            usage.prompt_tokens += result.prompt_tokens
            usage.completion_tokens += result.completion_tokens
            cache.put(key, result)
            for i in pending[key]:
                replies[i] = result
        if progress:
            progress(done, len(order))
    return replies


class EndpointTeacher(Teacher):
    """An OpenAI-compatible chat endpoint, asked concurrently; the `openai` client retries
    rate limits, server errors and dropped connections with exponential backoff."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, max_retries: int = 5, timeout_s: float = 120.0,
                 terms: str | None = None):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                             max_retries=max_retries, timeout=timeout_s)
        self.model, self.concurrency = model, concurrency
        self.id = f"{base_url.rstrip('/')}#{model}"
        self.terms = terms

    def _one(self, ask: Ask) -> Reply:
        extra = {"seed": ask.sample} if ask.temperature > 0 else {}
        out = self.client.chat.completions.create(
            model=self.model, messages=ask.chat(), temperature=ask.temperature,
            max_tokens=ask.max_tokens, **extra)
        choice = out.choices[0]
        usage = out.usage
        return Reply(choice.message.content or "",
                     usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                     truncated=choice.finish_reason == "length")

    def answer(self, asks):
        import openai

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._one, a): i for i, a in enumerate(asks)}
            try:
                for future in as_completed(futures):
                    try:
                        yield futures[future], future.result()
                    except (openai.AuthenticationError, openai.PermissionDeniedError,
                            openai.NotFoundError) as exc:  # no retry can fix these
                        raise TuneloopError(f"teacher {self.id} refused the request: {exc}. "
                                            "Check the base URL, the model name and the API key "
                                            "variable (teacher.api_key_env).") from None
                    except openai.OpenAIError as exc:
                        yield futures[future], exc
            finally:
                for f in futures:
                    f.cancel()


class LocalTeacher(Teacher):
    """A finished run's model (adapter on its base) or a catalog model, in this process;
    greedy requests are generated in length-grouped batches."""

    def __init__(self, model: str, registry, batch: int = 64):
        from tuneloop.tasks.trained import load_for_answers
        from tuneloop.models import catalog

        self.model, self.tokenizer, self.trained_for, run = load_for_answers(model, registry)
        base = run.base_model if run else model
        entry = catalog().get(base)
        self.terms = entry.licence["name"] if entry else None
        self.id = f"local:{model}"
        self.batch = batch

    def answer(self, asks):
        from tuneloop.core.tokenize import prompt_ids
        from tuneloop.models.generate import generate

        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(asks):
            groups.setdefault((a.temperature, a.max_tokens, a.sample), []).append(i)
        for (temperature, max_tokens, sample), idx in groups.items():
            for start in range(0, len(idx), self.batch):
                part = idx[start:start + self.batch]
                texts, counts = generate(self.model, self.tokenizer,
                                         [asks[i].chat() for i in part], max_tokens,
                                         temperature=temperature, seed=sample)
                for i, text, count in zip(part, texts, counts):
                    prompt = len(prompt_ids(self.tokenizer, asks[i].chat()))
                    yield i, Reply(text.strip(), prompt, count,
                                   truncated=count >= max_tokens)
