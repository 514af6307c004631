"""/v1/tuneloop/*: what the console's Runs, Data, Evaluations and Deployments pages read, scoped to
the caller's tenant like the rest of the API.

A tenant's runs are those its fine-tuning jobs produced and those it has deployed (on a server
started with `--no-auth` every run is the single user's). Reports are the same HTML that
`tuneloop runs report` and `tuneloop eval compare --html` write; promotion goes through the same
gate as `tuneloop deploy`, and its verdict is the error message when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from tuneloop.errors import TuneloopError
from tuneloop.serve import deploy as deployments
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError
from tuneloop.serve.files import file_object, get_file
from tuneloop.serve.schemas import Message, unix_time
from tuneloop.store import Registry, Run, new_id
from tuneloop.store.serving import Completion, Deployment, DeploymentEvent, Feedback, File, Job

routes = APIRouter()
MAX_PAGE = 200
TEST_CASES = "test-cases.jsonl"
_appending = threading.Lock()  # one writer at a time appends to a test-case file


def tenant_runs(registry: Registry, tenant: str, everything: bool = False) -> list[str]:
    """Ids of the runs a tenant may see, newest first."""
    with registry.session() as s:
        if everything:
            return list(s.scalars(select(Run.id).order_by(Run.created.desc())))
        ids = set(s.scalars(select(Job.run_id).where(Job.tenant == tenant,
                                                      Job.run_id.is_not(None))))
        ids |= set(s.scalars(select(DeploymentEvent.run_id).where(
            DeploymentEvent.tenant == tenant, DeploymentEvent.run_id.is_not(None))))
        return list(s.scalars(select(Run.id).where(Run.id.in_(ids)).order_by(Run.created.desc())))


def _visible_run(request: Request, who, run_id: str, param: str = "run_id") -> Run:
    registry = request.app.state.registry
    if run_id not in tenant_runs(registry, who.tenant, not request.app.state.settings.auth):
        raise ApiError(404, f"No such run: '{run_id}'", param=param, code="run_not_found")
    return registry.get_run(run_id)


def run_summary(run: Run) -> dict:
    metric = deployments.headline(run) if run.status == "done" else None
    return {"id": run.id, "name": run.name, "status": run.status, "method": run.method,
            "task": run.task, "base_model": run.base_model, "created_at": unix_time(run.created),
            "headline": metric, "value": (run.metrics or {}).get(metric) if metric else None,
            "gate": (run.metrics or {}).get("gate")}


@routes.get("/v1/tuneloop/runs")
def list_runs(request: Request, who: CallerDep):
    registry = request.app.state.registry
    ids = tenant_runs(registry, who.tenant, not request.app.state.settings.auth)
    return {"object": "list", "data": [run_summary(registry.get_run(i)) for i in ids]}


@routes.get("/v1/tuneloop/jobs/{job_id}/recipe",
             responses={409: {"description": "The job's recipe can no longer be resolved"}})
def job_settings(job_id: str, request: Request, who: CallerDep):
    """What a fine-tuning job trains with, as YAML: once training has started, the run's
    recipe.yaml (every key, and the plan made from them: steps, learning rate, batch tokens,
    rank); before that, the recipe its fields and `recipe` keys make. Data files are named by
    their file ids."""
    import yaml

    from tuneloop.serve.jobs import get_job, job_recipe

    registry = request.app.state.registry
    job = get_job(registry, who.tenant, job_id)
    written = Path(request.app.state.settings.workspace) / "runs" / (job.run_id or "-") / "recipe.yaml"
    if written.is_file():
        text = written.read_text(encoding="utf-8")
    else:
        try:
            recipe = json.loads(job_recipe(registry, job).model_dump_json())
        except TuneloopError as exc:  # a file removed since: say so rather than fail the page
            raise ApiError(409, str(exc), param="job_id", code="recipe_unavailable") from None
        text = yaml.safe_dump({"recipe": recipe}, sort_keys=False)
    with registry.session() as s:  # the tenant's file ids, not the server's paths
        for file_id in filter(None, (job.training_file, job.validation_file)):
            row = s.get(File, file_id)
            text = text.replace(row.path, file_id) if row else text
    return {"object": "fine_tuning.job.recipe", "job_id": job.id, "run_id": job.run_id,
            "resolved": written.is_file(), "yaml": text}


@routes.get("/v1/tuneloop/runs/{run_id}/report", response_class=HTMLResponse,
             responses={409: {"description": "The run has no results to report yet"}})
def run_report(run_id: str, request: Request, who: CallerDep):
    """The run's self-contained HTML report: scoreboard, per-class/field tables, worst errors,
    curves, forgetting check, judge verdicts."""
    from tuneloop.evaluate import run_report as report

    run = _visible_run(request, who, run_id)
    try:
        data = report.report_data(run.id, request.app.state.registry,
                                  Path(request.app.state.settings.workspace))
    except TuneloopError as exc:
        raise ApiError(409, str(exc), param="run_id", code="run_not_ready") from None
    return HTMLResponse(report.render_html(data))


@routes.get("/v1/tuneloop/compare", response_class=HTMLResponse,
             responses={409: {"description": "The two runs were not scored on the same test rows"}})
def compare_runs(a: str, b: str, request: Request, who: CallerDep):
    """Two runs on the same test rows: the difference with its interval, rows fixed and broken."""
    from tuneloop.evaluate import compare

    registry = request.app.state.registry
    first, second = _visible_run(request, who, a, "a"), _visible_run(request, who, b, "b")
    try:
        result = compare.compare([compare.load(first.id, registry),
                                  compare.load(second.id, registry)])
    except TuneloopError as exc:
        raise ApiError(409, str(exc), param="b", code="not_comparable") from None
    return HTMLResponse(compare.render_html(result))


@routes.get("/v1/tuneloop/files/{file_id}/rows")
def file_rows(file_id: str, request: Request, who: CallerDep,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20):
    """One page of an uploaded file's rows, with their line numbers."""
    row = get_file(request.app.state.registry, who.tenant, file_id)
    rows, total = [], 0
    with open(row.path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if offset <= total < offset + limit:
                rows.append({"line": number, "row": json.loads(line)})
            total += 1
    return {"object": "list", "file": file_id, "offset": offset, "total": total, "data": rows}


def _traffic(registry: Registry, tenant: str, name: str) -> dict:
    with registry.session() as s:
        latencies = sorted(s.scalars(select(Completion.latency_ms).where(
            Completion.tenant == tenant, Completion.model == name)))
        tokens = s.scalar(select(func.coalesce(func.sum(Completion.completion_tokens), 0)).where(
            Completion.tenant == tenant, Completion.model == name))
        ratings = list(s.execute(select(Feedback.kind, Feedback.rating).join(
            Completion, Feedback.completion_id == Completion.id).where(
            Completion.tenant == tenant, Completion.model == name)))
    requests = len(latencies)

    def pct(q: float) -> float | None:
        return round(latencies[min(requests - 1, int(q * requests))], 1) if requests else None

    return {"requests": requests, "completion_tokens": int(tokens), "latency_p50_ms": pct(0.5),
            "latency_p95_ms": pct(0.95), "feedback": len(ratings),
            "thumbs_up": sum(r == 1 for _, r in ratings),
            "thumbs_down": sum(r == -1 for _, r in ratings),
            "corrections": sum(k == "correction" for k, _ in ratings),
            "feedback_rate": round(len(ratings) / requests, 3) if requests else None}


@routes.get("/v1/tuneloop/deployments")
def list_deployments(request: Request, who: CallerDep):
    registry = request.app.state.registry
    out = []
    for row in deployments.deployments(registry, who.tenant):
        run = registry.get_run(row.run_id)
        history = deployments.events(registry, row.name, who.tenant)
        out.append({
            "name": row.name, "run": run_summary(run), "updated_at": unix_time(row.updated),
            "history": [_event(e) | {"created_at": unix_time(e.created)}
                        for e in reversed(history)],
            "can_roll_back": len(deployments.run_stack(history)) > 1,
            "traffic": _traffic(registry, who.tenant, row.name)})
    return {"object": "list", "data": out}


class Promote(BaseModel):
    run_id: str
    force: bool = False


def _event(event: DeploymentEvent) -> dict:
    return {"name": event.name, "action": event.action, "run_id": event.run_id,
            "previous_run_id": event.previous_run_id, "forced": event.forced,
            "reason": event.reason}


@routes.post("/v1/tuneloop/deployments/{name}/promote",
              responses={409: {"description": "The gate refused the promotion"}})
async def promote(name: str, body: Promote, request: Request, who: CallerDep):
    """Point `name` at a run if its evidence allows (the gate, and beating the current run)."""
    registry = request.app.state.registry
    run = _visible_run(request, who, body.run_id)
    try:
        event = await run_in_threadpool(deployments.deploy, registry, name, run.id, who.tenant,
                                        body.force)
    except TuneloopError as exc:
        raise ApiError(409, str(exc), param="run_id", code="promotion_refused") from None
    return _event(event)


@routes.post("/v1/tuneloop/deployments/{name}/rollback",
              responses={409: {"description": "Nothing to roll back to"}})
async def roll_back(name: str, request: Request, who: CallerDep):
    registry = request.app.state.registry
    with registry.session() as s:
        row = s.get(Deployment, name)
    if row is None or row.tenant != who.tenant:
        raise ApiError(404, f"No such deployment: '{name}'", param="name",
                       code="deployment_not_found")
    try:
        event = await run_in_threadpool(deployments.rollback, registry, name, who.tenant)
    except TuneloopError as exc:
        raise ApiError(409, str(exc), param="name", code="rollback_refused") from None
    return _event(event)


class TestCase(BaseModel):
    messages: list[Message] = Field(min_length=1)
    answer: str = Field(min_length=1)


@routes.post("/v1/tuneloop/test_cases")
def save_test_case(body: TestCase, request: Request, who: CallerDep):
    """Append a conversation and its right answer to the tenant's test-cases.jsonl file (one of
    its /v1/files, usable as test or training data)."""
    registry = request.app.state.registry
    folder = Path(request.app.state.settings.workspace) / "files"
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"messages": [{"role": m.role, "content": m.text()} for m in body.messages]
                       + [{"role": "assistant", "content": body.answer}]}, ensure_ascii=False)
    with _appending, registry.session() as s, s.begin():
        row = s.scalars(select(File).where(File.tenant == who.tenant,
                                           File.filename == TEST_CASES)).first()
        if row is None:
            file_id = new_id("file")
            row = File(id=file_id, tenant=who.tenant, filename=TEST_CASES, purpose="fine-tune",
                       bytes=0, sha256="", path=str(folder / f"{file_id}.jsonl"))
            s.add(row)
        old = Path(row.path).read_bytes() if Path(row.path).exists() else b""
        data = old + (line + "\n").encode()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".test-cases-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, row.path)  # readers see the old file or the new one, never half
        row.bytes, row.sha256 = len(data), hashlib.sha256(data).hexdigest()
        s.flush()
        out = file_object(row)
    return {**out, "rows": data.count(b"\n")}
