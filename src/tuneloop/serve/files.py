"""/v1/files: training files uploaded by a tenant, checked line by line on upload."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from tuneloop.core.formats import scan
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError
from tuneloop.serve.schemas import unix_time
from tuneloop.store import Registry, new_id
from tuneloop.store.serving import File

routes = APIRouter()


def file_object(row: File) -> dict:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "filename": row.filename,
            "created_at": unix_time(row.created), "purpose": row.purpose, "status": "processed",
            "status_details": None}


@routes.post("/v1/files", responses={507: {"description": "The server has no space left to store the file"}})
async def upload(request: Request, who: CallerDep, file: UploadFile,
                 purpose: Literal["fine-tune"] = Form(...)):
    folder = Path(request.app.state.settings.workspace) / "files"
    folder.mkdir(parents=True, exist_ok=True)
    digest, size, tmp = hashlib.sha256(), 0, None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            while chunk := await file.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        row = await run_in_threadpool(_register, request.app.state.registry, who.tenant,
                                      Path(tmp), file.filename or "upload.jsonl", size,
                                      digest.hexdigest())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ApiError(507, "The server has no space left to store this file; nothing was "
                       "kept. Try again later, or ask its operator to free space.",
                       type="server_error", code="insufficient_storage") from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return file_object(row)


def _register(registry: Registry, tenant: str, tmp: Path, filename: str, size: int,
              sha256: str) -> File:
    """Check every line; keep the file (renamed into place) only if all of them are usable."""
    report = scan(tmp)
    if not report.ok or report.valid == 0:
        # the client's name for the file, never the server's temporary path
        shown = "; ".join((f"line {p.line}: " if p.line else "")
                          + p.message.replace(str(tmp), filename) for p in report.problems[:5])
        more = sum(report.counts.values()) - min(5, len(report.problems))
        raise ApiError(400, f"{filename}: {shown or 'no usable rows'}"
                       + (f" (and {more} more problems)" if more > 0 else ""),
                       param="file", code="invalid_file")
    file_id = new_id("file")
    final = tmp.parent / f"{file_id}.jsonl"
    os.replace(tmp, final)
    try:
        with registry.session() as s, s.begin():
            row = File(id=file_id, tenant=tenant, filename=filename, purpose="fine-tune",
                       bytes=size, sha256=sha256, path=str(final))
            s.add(row)
    except BaseException:  # (the registry went away) a file no row names is not kept either
        final.unlink(missing_ok=True)
        raise
    return row


def get_file(registry: Registry, tenant: str, file_id: str, param: str = "file_id") -> File:
    with registry.session() as s:
        row = s.get(File, file_id)
    if row is None or row.tenant != tenant:
        raise ApiError(404, f"No such file: '{file_id}'", param=param, code="file_not_found")
    return row


@routes.get("/v1/files")
def list_files(request: Request, who: CallerDep):
    with request.app.state.registry.session() as s:
        rows = s.scalars(select(File).where(File.tenant == who.tenant).order_by(File.created.desc()))
        return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@routes.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request, who: CallerDep):
    return file_object(get_file(request.app.state.registry, who.tenant, file_id))


@routes.get("/v1/files/{file_id}/content",
             responses={200: {"content": {"application/jsonl": {}}}})
def file_content(file_id: str, request: Request, who: CallerDep):
    row = get_file(request.app.state.registry, who.tenant, file_id)
    return FileResponse(row.path, media_type="application/jsonl", filename=row.filename)


@routes.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request, who: CallerDep):
    row = get_file(request.app.state.registry, who.tenant, file_id)
    with request.app.state.registry.session() as s, s.begin():
        s.delete(s.get(File, row.id))
    Path(row.path).unlink(missing_ok=True)
    return {"id": row.id, "object": "file", "deleted": True}
