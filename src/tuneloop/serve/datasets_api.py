"""/v1/tuneloop/datasets: prepared versions of a tenant's uploaded files (the console's Data page).

`POST /v1/tuneloop/files/FILE/prepare` runs `tuneloop data prepare` on one uploaded file:
clean, deduplicate, anonymize, split, with the same recipe keys as a preparation recipe. The
version is recorded in the registry with its report, and each of its splits becomes one of the
tenant's files, ready for a fine-tuning job. A tenant's versions are those holding the content
of one of its files (versions are content-addressed: the same rows prepared twice are one
version); on a server started with `--no-auth`, every version of the workspace.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from tuneloop.errors import TuneloopError
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError
from tuneloop.serve.files import get_file
from tuneloop.serve.jobs import yaml_keys
from tuneloop.serve.schemas import unix_time
from tuneloop.store import DatasetVersion, Registry, new_id
from tuneloop.store.serving import File

routes = APIRouter()
# The body names the task and version; server paths are not the caller's to choose.
BODY_KEYS = ("task", "name", "inputs", "check_against")


class PrepareBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: Literal["classify", "extract", "chat"] = "chat"
    name: str | None = Field(None, max_length=200)
    recipe: dict | str | None = None  # preparation recipe keys: clean, dedup, anonymize, split...


def _visible(request: Request, files: dict[str, str]) -> list[DatasetVersion]:
    """The versions holding one of the tenant's files (`files`: content hash → file id)."""
    versions = request.app.state.registry.list_versions(limit=500)
    if not request.app.state.settings.auth:
        return versions
    return [v for v in versions if any(info.get("sha256") in files
                                       for info in (v.report.get("splits") or {}).values())]


def version_summary(version: DatasetVersion, files: dict[str, str]) -> dict:
    report = version.report
    steps = [{"name": s["name"], "rows_in": s["rows_in"], "rows_out": s["rows_out"],
              "changed": s["changed"], "removed": s["removed"]} for s in report["steps"]]
    pii = report.get("pii") or {}
    return {
        "id": version.id, "object": "dataset.version", "name": version.name, "task": version.task,
        "parent": version.parent, "created_at": unix_time(version.created),
        "splits": {split: {"rows": info["rows"], "file_id": files.get(info["sha256"])}
                   for split, info in report["splits"].items()},
        "steps": steps,
        "duplicates": sum(n for s in steps if s["name"].startswith("dedup")
                          for n in s["removed"].values()),
        "pii": {"rows": pii.get("rows_with_pii", 0), "by_type": pii.get("by_type", {})}
        if report.get("pii") else None,
    }


def _file_ids(registry: Registry, tenant: str) -> dict[str, str]:
    """Content hash → the tenant's newest file of that content."""
    with registry.session() as s:
        rows = s.scalars(select(File).where(File.tenant == tenant).order_by(File.created))
        return {f.sha256: f.id for f in rows}


@routes.get("/v1/tuneloop/datasets")
def list_datasets(request: Request, who: CallerDep):
    files = _file_ids(request.app.state.registry, who.tenant)
    return {"object": "list", "data": [version_summary(v, files) for v in _visible(request, files)]}


@routes.get("/v1/tuneloop/datasets/{version_id}/report", response_class=HTMLResponse)
def dataset_report(version_id: str, request: Request, who: CallerDep):
    """The version's HTML report (`tuneloop data report`): removals per step with examples,
    labels, token lengths, personal data by type, duplicate clusters."""
    from tuneloop.data.report import render_html

    files = _file_ids(request.app.state.registry, who.tenant)
    found = [v for v in _visible(request, files) if v.id == version_id]
    if not found:
        raise ApiError(404, f"No such dataset version: '{version_id}'", param="version_id",
                       code="dataset_not_found")
    return HTMLResponse(render_html(found[0].report))


@routes.post("/v1/tuneloop/files/{file_id}/prepare")
async def prepare_file(file_id: str, body: PrepareBody, request: Request, who: CallerDep):
    registry = request.app.state.registry
    row = get_file(registry, who.tenant, file_id)
    keys = yaml_keys(body.recipe, "'dedup: {near: {threshold: 0.9}}' or "
                                  "'anonymize: {mode: fake}'") or {}
    taken = [k for k in BODY_KEYS if k in keys]
    if taken:
        raise ApiError(400, f"recipe.{taken[0]} cannot be set here: the task and name are fields "
                       "of the request, and the input is the file", param="recipe",
                       code="invalid_recipe")
    from tuneloop.data.prepare_recipe import prepare_recipe_from_dict

    try:
        spec = prepare_recipe_from_dict({**keys, "task": body.task, "name": body.name}, "recipe")
    except TuneloopError as exc:
        raise ApiError(400, str(exc), param="recipe", code="invalid_recipe") from None
    version, files, created = await run_in_threadpool(
        _prepare, registry, who.tenant, row, spec, Path(request.app.state.settings.workspace))
    return {**version_summary(version, files), "created": created}


def _prepare(registry: Registry, tenant: str, row: File, spec, workspace: Path):
    from tuneloop.data import curate
    from tuneloop.data.ingest import read_rows

    try:
        version = curate.prepare(recipe=spec, workspace=workspace,
                                 sources=[(row.filename, read_rows(row.path))],
                                 lineage={"kind": "upload", "file": row.id,
                                          "filename": row.filename, "sha256": row.sha256})
    except TuneloopError as exc:
        raise ApiError(400, str(exc), param="file_id", code="invalid_file") from None
    files = _file_ids(registry, tenant)
    for split, info in version.report["splits"].items():
        if info["sha256"] not in files:
            files[info["sha256"]] = _add_split(registry, tenant, version, split, info, workspace)
    with registry.session() as s:
        recorded = s.get(DatasetVersion, version.id)
    return recorded, files, version.created


def _add_split(registry: Registry, tenant: str, version, split: str, info: dict,
               workspace: Path) -> str:
    """A copy of one split as the tenant's file (deleting the file leaves the version whole)."""
    folder = workspace / "files"
    folder.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".split-")
    os.close(fd)
    shutil.copyfile(version.path(split), tmp)
    final = folder / f"{file_id}.jsonl"
    os.replace(tmp, final)
    with registry.session() as s, s.begin():
        s.add(File(id=file_id, tenant=tenant, filename=f"{version.id}-{split}.jsonl",
                   purpose="fine-tune", bytes=final.stat().st_size, sha256=info["sha256"],
                   path=str(final)))
    return file_id
