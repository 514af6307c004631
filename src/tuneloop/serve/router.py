"""Model names → engines. A base model name is served by its engine as is; a deployment name
is a run: a LoRA adapter rides on its base's engine (sharing it with every other adapter of
that base), while a full fine-tune, or an adapter with parts stacked LoRA does not cover
(DoRA, say), gets an engine of its own, its adapter merged. The bases and their LoRA adapters
are served by the engine `--engine` names (`ENGINES`: the built-in one, or vLLM's,
serve/vllm.py); the merged engines stay built-in, since vLLM serves one model per process
and no DoRA."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from tuneloop import models
from tuneloop.models.head import HEAD_FILE
from tuneloop.serve.adapters import BASE, Unsupported, check_supported
from tuneloop.serve.auth import Caller
from tuneloop.serve.engine import Engine
from tuneloop.store import Registry, Run
from tuneloop.store.serving import Deployment
from tuneloop.tasks import TaskInfo


@dataclass(frozen=True)
class Target:
    """Where a request for one model name goes."""

    name: str
    engine: Engine
    adapter: str = BASE
    adapter_path: Path | None = None
    run_id: str | None = None
    task: TaskInfo | None = None
    head: Path | None = None  # a classifier's label head (models/head.py), which decides
    spans: bool = False  # an extractor's span head (models/spans.py) answers, on its own engine


@dataclass(frozen=True)
class EngineKind:
    """A way to serve the base models and their LoRA adapters (`tuneloop serve --engine NAME`).

    build(base, settings) -> the base's engine: an object with `submit`, `status` and `close`,
    as serve/engine.py's and serve/vllm.py's. check(settings) refuses, before the server
    starts, settings it cannot run with (and may resolve them). warm: start every base's
    engine with the app rather than on its first request."""

    build: Callable
    check: Callable = lambda settings: None
    warm: bool = False


def _builtin(base: str, settings) -> Engine:
    return Engine(models.load_model(base).eval(), models.load_tokenizer(base),
                  name=f"engine-{base}", **builtin_options(settings))


def builtin_options(settings) -> dict:
    return {"max_batch": settings.max_batch,
            "adapter_budget_bytes": settings.adapter_budget_mb * 2**20}


def _vllm(base: str, settings):
    from tuneloop.serve.vllm import VllmEngine

    return VllmEngine(base, python=settings.vllm_python, max_batch=settings.max_batch,
                      args=tuple(settings.vllm_args), log_dir=Path(settings.workspace) / "logs")


def _check_vllm(settings) -> None:
    from tuneloop.serve.vllm import check_python

    settings.vllm_python = check_python(settings.vllm_python or "python3")


# The serving engines by name: a new one is an EngineKind and one line here.
ENGINES = {"builtin": EngineKind(_builtin),
           "vllm": EngineKind(_vllm, _check_vllm, warm=True)}  # vLLM takes a while to start


class NotFound(Exception):
    """The model does not exist for this caller (the same answer whether it exists elsewhere)."""


@lru_cache(maxsize=1024)
def _artifact(folder: Path) -> tuple[dict, bool, Path | None]:
    """(tuneloop.json, whether stacked LoRA serves it, its label head's file or None) of a
    finished run's artifact. Read once per folder, not on every request: a finished run's
    artifact does not change. A span head's pass is the model's own (models/spans.py), so
    its run is served merged, on an engine of its own."""
    meta = json.loads((folder / "tuneloop.json").read_text())
    head = folder / HEAD_FILE if (folder / HEAD_FILE).exists() else None
    try:
        if meta.get("method") == "full":
            raise Unsupported("a full fine-tune")
        if meta.get("head") == "spans":
            raise Unsupported("a span head")
        check_supported(folder)
    except Unsupported:
        return meta, False, head
    return meta, True, head


class Router:
    """Resolves the model names a tenant may call, creating engines on first use."""

    def __init__(self, registry: Registry, settings):
        self.registry = registry
        self.settings = settings  # serve/app.py's Settings
        self.bases = list(settings.bases)
        self.kind = ENGINES[settings.engine]
        self.engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def allowed_bases(self, caller: Caller) -> list[str]:
        """The served base models this caller may call (and fine-tune)."""
        return [b for b in self.bases if caller.bases is None or b in caller.bases]

    def visible(self, caller: Caller) -> list[tuple[str, str]]:
        """(name, owner) of every model the caller may use: its bases and its deployments."""
        names = [(b, "tuneloop") for b in self.allowed_bases(caller)]
        with self.registry.session() as s:
            rows = s.scalars(select(Deployment).where(Deployment.tenant == caller.tenant)
                             .order_by(Deployment.name))
            names += [(row.name, caller.tenant) for row in rows]
        return names

    def resolve(self, caller: Caller, name: str) -> Target:
        """The target of model `name` for this caller, or NotFound."""
        if name in self.bases:
            if name not in self.allowed_bases(caller):
                raise NotFound(name)
            return Target(name, self.engine(name))
        with self.registry.session() as s:
            row = s.get(Deployment, name)
            if row is None or row.tenant != caller.tenant:
                raise NotFound(name)
            run = s.get(Run, row.run_id)
        folder = Path(run.adapter_path)
        meta, stackable, head = _artifact(folder)
        task = TaskInfo.from_dict(meta["task"]) if meta.get("task") else None
        if not stackable or (head and self.kind is not ENGINES["builtin"]):
            # its own engine, the adapter merged into a copy of the base (a label head
            # decides only in the built-in engine)
            return Target(name, self.engine(run.id, artifact=folder), run_id=run.id, task=task,
                          head=head, spans=meta.get("head") == "spans")
        # PEFT adapter names become module keys: the run id is unique and safe there.
        return Target(name, self.engine(meta["base_model"]), adapter=run.id.replace("-", "_"),
                      adapter_path=folder, run_id=run.id, task=task, head=head)

    def engine(self, key: str, artifact: Path | None = None) -> Engine:
        """The engine of a base model (or of one run's own weights), loaded on first use."""
        with self._lock:
            if key not in self.engines:
                if artifact is None:
                    self.engines[key] = self.kind.build(key, self.settings)
                    return self.engines[key]
                from tuneloop.models import load_artifact

                model, meta = load_artifact(artifact)  # merged: always the built-in engine
                if meta.get("method") != "full":
                    model = model.merge_and_unload()
                self.engines[key] = Engine(model.eval(), models.load_tokenizer(meta["base_model"]),
                                           name=f"engine-{key}", **builtin_options(self.settings))
            return self.engines[key]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
