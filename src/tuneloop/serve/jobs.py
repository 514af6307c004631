"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over tuneloop's own training.

A job is a row in the registry; the worker process (worker.py) takes it through
validating_files → queued → running → succeeded | failed | cancelled, so jobs outlive the API
process. A succeeded job's model is deployed for its tenant as ft:BASE:TENANT:SUFFIX:ID.

One extension: `recipe`, tuneloop recipe keys (a mapping, or YAML text) laid over what the
job's own fields say (`task: classify`, `method: full`, `lora: {rank: 16}`, `epochs: 3`...). It
is checked when the job is created, so a mistake is a 400 naming the key, never a failed job.
The job's model and files stay the job's: `base_model`, `data` and `name` are refused there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter, Request
from pydantic import Field
from sqlalchemy import select

from tuneloop import methods
from tuneloop.errors import TuneloopError
from tuneloop.project import Recipe, recipe_from_dict
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError
from tuneloop.serve.files import get_file
from tuneloop.serve.schemas import EventLimit, Limit, Open, unix_time
from tuneloop.store import Registry, utcnow, new_id
from tuneloop.store.serving import File, Job, JobEvent

routes = APIRouter()
FINAL = ("succeeded", "failed", "cancelled")
JOB_KEYS = ("base_model", "data", "name")  # set by the job's model, files and id
STARTS = ("Fine-tuning job started", "Resuming run")  # the worker's events when training begins


class Hyperparameters(Open):
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    beta: float | Literal["auto"] = "auto"  # DPO only


# OpenAI's fine-tuning method types, and the method each trains with here.
OPENAI_METHODS = {"supervised": "lora", "dpo": "dpo"}


class MethodBody(Open):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: dict | None = None
    dpo: dict | None = None

    def hyperparameters(self) -> dict:
        section = getattr(self, self.type) or {}  # (the section named by the type)
        return Hyperparameters(**section.get("hyperparameters", {})).model_dump()


class JobRequest(Open):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # the older top-level form
    method: MethodBody | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    recipe: dict | str | None = None  # tuneloop recipe keys; see the module's docstring


def yaml_keys(raw: dict | str | None, example: str, param: str = "recipe") -> dict | None:
    """A body field of recipe keys as a mapping (YAML text is parsed), or a 400 saying why not."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ApiError(400, f"{param} is not valid YAML{where}: "
                           f"{getattr(exc, 'problem', None) or exc}", param=param,
                           code="invalid_recipe") from None
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise ApiError(400, f"{param} must be a mapping of recipe keys, such as {example}",
                       param=param, code="invalid_recipe")
    return raw


def recipe_keys(raw: dict | str | None) -> dict | None:
    """The `recipe` extension of a job: training recipe keys other than the job's own."""
    keys = yaml_keys(raw, "'task: classify' or 'lora: {rank: 16}'")
    taken = [k for k in JOB_KEYS if k in (keys or {})]
    if taken:
        raise ApiError(400, f"recipe.{taken[0]} is set by the job itself (model, training_file, "
                       "validation_file); remove it from the recipe", param="recipe",
                       code="invalid_recipe")
    return keys


def job_recipe(registry: Registry, job: Job) -> Recipe:
    """The recipe a job trains with: its OpenAI fields, then its `recipe` keys over them."""
    kind = job.method["type"]
    method = OPENAI_METHODS[kind]
    hyper = job.method[kind]["hyperparameters"]
    with registry.session() as s:
        data = {"train": s.get(File, job.training_file).path}
        if job.validation_file:
            data["validation"] = s.get(File, job.validation_file).path
    recipe = {"base_model": job.model, "task": "chat", "data": data, "name": job.id,
              "method": method, "seed": job.seed, "baselines": []}
    if hyper.get("n_epochs") not in (None, "auto"):
        recipe["epochs"] = hyper["n_epochs"]
    if hyper.get("batch_size") not in (None, "auto"):  # examples per update, as OpenAI's
        recipe["batch_size"] = hyper["batch_size"]
    if hyper.get("learning_rate_multiplier") not in (None, "auto"):
        recipe["learning_rate"] = (methods.method(method).learning_rate
                                   * hyper["learning_rate_multiplier"])
    if methods.method(method).trains_on == "pairs" and hyper.get("beta") not in (None, "auto"):
        recipe["dpo"] = {"beta": hyper["beta"]}
    return recipe_from_dict({**recipe, **(job.recipe or {})},
                            source=f"the recipe of fine-tuning job {job.id}")


def job_object(job: Job) -> dict:
    method = job.method
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": unix_time(job.created),
        "finished_at": unix_time(job.finished), "model": job.model, "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant, "status": job.status,
        "hyperparameters": method[method["type"]]["hyperparameters"],
        "method": method, "training_file": job.training_file,
        "validation_file": job.validation_file, "result_files": [], "trained_tokens": job.trained_tokens,
        "error": job.error, "seed": job.seed, "metadata": job.meta, "integrations": [],
        "estimated_finish": None, "user_provided_suffix": job.suffix, "recipe": job.recipe,
    }


def estimated_finish(registry: Registry, job: Job) -> int | None:
    """When a running job's training should end (unix time), from the pace between the first
    and newest step events since training (re)started; None until two steps are reported."""
    if job.status != "running":
        return None
    rows = []
    with registry.session() as s:
        for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)):
            if e.message.startswith(STARTS):
                rows = []  # a resumed job's pace starts again (the gap is not training time)
            elif isinstance(e.data, dict) and "total_steps" in e.data:
                rows.append(e)
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    steps, seconds = last.data["step"] - first.data["step"], (last.created - first.created).total_seconds()
    if steps <= 0 or seconds <= 0:
        return None
    return unix_time(last.created) + round((last.data["total_steps"] - last.data["step"]) * seconds / steps)


def add_event(registry: Registry, job_id: str, message: str, level: str = "info",
              data: dict | None = None) -> None:
    with registry.session() as s, s.begin():
        s.add(JobEvent(job_id=job_id, level=level, message=message, data=data))


def get_job(registry: Registry, tenant: str, job_id: str) -> Job:
    with registry.session() as s:
        job = s.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise ApiError(404, f"No such fine-tuning job: '{job_id}'", param="fine_tuning_job_id",
                       code="job_not_found")
    return job


@routes.post("/v1/fine_tuning/jobs")
def create_job(body: JobRequest, request: Request, who: CallerDep):
    registry = request.app.state.registry
    if body.model not in request.app.state.router.allowed_bases(who):
        raise ApiError(404, f"The model '{body.model}' does not exist or is not available to "
                       "fine-tune here", param="model", code="model_not_found")
    get_file(registry, who.tenant, body.training_file, "training_file")
    if body.validation_file:
        get_file(registry, who.tenant, body.validation_file, "validation_file")
    method = body.method or MethodBody()
    hyper = method.hyperparameters()
    if body.hyperparameters is not None and body.method is None:
        hyper = body.hyperparameters.model_dump()
    job = Job(id=new_id("ftjob"), tenant=who.tenant, model=body.model,
              training_file=body.training_file, validation_file=body.validation_file,
              method={"type": method.type, method.type: {"hyperparameters": hyper}},
              suffix=body.suffix or None, seed=body.seed if body.seed is not None else 42,
              meta=body.metadata, status="validating_files", cancel_requested=False,
              recipe=recipe_keys(body.recipe))
    try:
        job_recipe(registry, job)
    except TuneloopError as exc:
        raise ApiError(400, str(exc), param="recipe", code="invalid_recipe") from None
    with registry.session() as s, s.begin():
        s.add(job)
    add_event(registry, job.id, f"Created fine-tuning job: {job.id}")
    return job_object(job)


@routes.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, who: CallerDep, limit: Limit = 20, after: str | None = None):
    with request.app.state.registry.session() as s:
        rows = list(s.scalars(select(Job).where(Job.tenant == who.tenant)
                              .order_by(Job.created.desc(), Job.id.desc())))
    if after:
        ids = [r.id for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": [job_object(r) for r in rows[:limit]],
            "has_more": len(rows) > limit}


@routes.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, request: Request, who: CallerDep):
    registry = request.app.state.registry
    job = get_job(registry, who.tenant, job_id)
    return {**job_object(job), "estimated_finish": estimated_finish(registry, job)}


@routes.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, who: CallerDep):
    """A job not yet running is cancelled at once; a running one stops at its next step."""
    registry = request.app.state.registry
    get_job(registry, who.tenant, job_id)
    with registry.session() as s, s.begin():
        job = s.get(Job, job_id, with_for_update=True)
        if job.status in FINAL:
            raise ApiError(400, f"Job {job_id} has already {job.status}", code="invalid_state")
        job.cancel_requested = True
        if job.status != "running":
            job.status, job.finished = "cancelled", utcnow()
    add_event(registry, job_id, "Cancellation requested" if job.status == "running" else "Job cancelled")
    return job_object(job)


@routes.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(job_id: str, request: Request, who: CallerDep, limit: EventLimit = 20,
               after: str | None = None):
    registry = request.app.state.registry
    get_job(registry, who.tenant, job_id)
    with registry.session() as s:
        q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        if after and after.startswith("ftevent-") and after[8:].isdigit():
            q = q.where(JobEvent.id < int(after[8:]))
        rows = list(s.scalars(q.limit(limit + 1)))
    data = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e.id}", "created_at": unix_time(e.created),
             "level": e.level, "message": e.message, "data": e.data,
             "type": "metrics" if e.data else "message"} for e in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


@routes.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, request: Request, who: CallerDep, limit: Limit = 10):
    registry = request.app.state.registry
    job = get_job(registry, who.tenant, job_id)
    folder = Path(request.app.state.settings.workspace) / "runs" / (job.run_id or "-") / "checkpoints"
    steps = sorted((int(p.name[5:]) for p in folder.glob("step-*") if p.name[5:].isdigit()),
                   reverse=True)
    data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job.id}-{n}",
             "created_at": int((folder / f"step-{n:06d}").stat().st_mtime),
             "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or job.id}:ckpt-step-{n}",
             "step_number": n, "metrics": {}, "fine_tuning_job_id": job.id} for n in steps[:limit]]
    return {"object": "list", "data": data, "has_more": len(steps) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def start_worker(workspace: Path) -> subprocess.Popen:
    """The job worker as its own process: training never blocks the API, and a job survives
    an API restart (a new worker picks up queued jobs and resumes interrupted ones)."""
    env = dict(os.environ, TUNELOOP_HOME=str(workspace))
    return subprocess.Popen([sys.executable, "-m", "tuneloop.serve.worker"], env=env)


def stop_worker(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
