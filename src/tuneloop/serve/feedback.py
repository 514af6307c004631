"""The request log and feedback: every completion is logged; users rate it, correct it, or
prefer it to another; `export` turns that into SFT and DPO dataset versions whose rows name the
logged completions they came from.

Ratings are thumbs: 1 (good), 0 (neutral), -1 (bad). A good completion becomes an SFT row; a
correction becomes an SFT row and, against the original reply, a DPO pair; a preference between
two completions of the same conversation becomes a DPO pair.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy import delete, exists, select
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from tuneloop.errors import TuneloopError
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError
from tuneloop.serve.schemas import FeedbackRequest, unix_time
from tuneloop.store import Registry, new_id, unavailable, utcnow
from tuneloop.store.serving import Completion, Feedback

routes = APIRouter()
log = logging.getLogger("tuneloop.serve")


def log_completion(registry: Registry, who, target, request: dict, response: dict,
                   latency_s: float) -> None:
    """One row per completion: what was asked, what was answered, by which run, how fast."""
    with registry.session() as s, s.begin():
        s.add(Completion(id=response["id"], tenant=who.tenant, key_id=who.key_id,
                         model=request["model"], run_id=target.run_id, request=request,
                         response=response, prompt_tokens=response["usage"]["prompt_tokens"],
                         completion_tokens=response["usage"]["completion_tokens"],
                         latency_ms=latency_s * 1000))


def log_completion_if_able(registry: Registry, who, target, request: dict, response: dict,
                           latency_s: float) -> bool:
    """`log_completion`, except that a registry that cannot be reached (restarting) does not
    fail an answer the model already gave: the reply goes out unlogged (feedback on it is then
    refused as unknown) and the server's log says so."""
    try:
        log_completion(registry, who, target, request, response, latency_s)
        return True
    except DBAPIError as exc:
        if not unavailable(exc):
            raise
        log.warning("completion %s answered but not logged: the registry cannot be reached (%s)",
                    response["id"], exc.orig)
        return False


def apply_retention(registry: Registry, days: int) -> int:
    """Delete logged completions older than `days` that carry no feedback (feedback rows, and
    the completions they name, are training data with lineage: they are kept)."""
    cutoff = utcnow() - dt.timedelta(days=days)
    with registry.session() as s, s.begin():
        has_feedback = exists().where((Feedback.completion_id == Completion.id)
                                      | (Feedback.other_completion_id == Completion.id))
        result = s.execute(delete(Completion).where(Completion.created < cutoff, ~has_feedback)
                           .execution_options(synchronize_session=False))
        return result.rowcount or 0


@routes.post("/v1/feedback")
async def post_feedback(body: FeedbackRequest, request: Request, who: CallerDep):
    try:
        kind = body.kind()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="rating") from None
    row = await run_in_threadpool(_store_feedback, request.app.state.registry, who.tenant, body, kind)
    return {"id": row.id, "object": "feedback", "completion_id": row.completion_id, "kind": kind,
            "created": unix_time(row.created)}


def _store_feedback(registry: Registry, tenant: str, body: FeedbackRequest, kind: str) -> Feedback:
    with registry.session() as s, s.begin():
        completion = s.get(Completion, body.completion_id)
        if completion is None or completion.tenant != tenant:
            raise ApiError(404, f"No completion '{body.completion_id}' (it may be past the log's "
                           "retention)", param="completion_id", code="completion_not_found")
        if body.choice >= len(completion.response["choices"]):
            raise ApiError(400, f"choice {body.choice} does not exist: the completion has "
                           f"{len(completion.response['choices'])}", param="choice")
        if kind == "rating" and body.rating not in (-1, 0, 1):
            raise ApiError(400, "rating must be 1 (good), 0 (neutral) or -1 (bad)", param="rating")
        if kind == "preference":
            other = s.get(Completion, body.preferred_over)
            if other is None or other.tenant != tenant:
                raise ApiError(404, f"No completion '{body.preferred_over}'",
                               param="preferred_over", code="completion_not_found")
            if other.request.get("messages") != completion.request.get("messages"):
                raise ApiError(400, "a preference compares two replies to the same messages; "
                               "these two completions answered different ones",
                               param="preferred_over")
        row = Feedback(id=new_id("fb"), completion_id=completion.id, tenant=tenant, kind=kind,
                       choice=body.choice, rating=body.rating, correction=body.correction,
                       other_completion_id=body.preferred_over, comment=body.comment)
        s.add(row)
        return row


def _reply(completion: Completion, choice: int) -> str:
    c = completion.response["choices"][choice]
    return c["message"]["content"] if "message" in c else c["text"]


def export(registry: Registry, adapter: str, out: Path, tenant: str | None = None) -> dict:
    """Write feedback on deployment `adapter` as sft.jsonl and dpo.jsonl under `out` (written to
    a temporary folder, then renamed), register both as datasets, and return their summary."""
    with registry.session() as s:
        q = (select(Feedback, Completion).join(Completion, Feedback.completion_id == Completion.id)
             .where(Completion.model == adapter).order_by(Feedback.created))
        if tenant:
            q = q.where(Completion.tenant == tenant)
        pairs = s.execute(q).all()
        others = {c.id: c for c in s.scalars(select(Completion).where(Completion.id.in_(
            [f.other_completion_id for f, _ in pairs if f.other_completion_id])))}
    if not pairs:
        raise TuneloopError(f"no feedback on '{adapter}' yet; clients send it to POST /v1/feedback")
    sft, dpo = [], []
    for fb, completion in pairs:
        messages = completion.request.get("messages") or [
            {"role": "user", "content": completion.request.get("prompt", "")}]
        lineage = {"completion_id": completion.id, "feedback_id": fb.id, "run_id": completion.run_id}
        reply = _reply(completion, fb.choice)
        if fb.kind == "rating" and fb.rating == 1:
            sft.append({"messages": [*messages, {"role": "assistant", "content": reply}], **lineage})
        elif fb.kind == "correction":
            sft.append({"messages": [*messages, {"role": "assistant", "content": fb.correction}],
                        **lineage})
            if fb.correction.strip() != reply.strip():
                dpo.append({"prompt": messages, "chosen": fb.correction, "rejected": reply, **lineage})
        elif fb.kind == "preference" and fb.other_completion_id in others:
            rejected = _reply(others[fb.other_completion_id], 0)
            if rejected.strip() != reply.strip():
                dpo.append({"prompt": messages, "chosen": reply, "rejected": rejected,
                            "other_completion_id": fb.other_completion_id, **lineage})
    return _write_version(registry, out, {"sft": sft, "dpo": dpo}, adapter)


def _write_version(registry: Registry, out: Path, files: dict[str, list[dict]], adapter: str) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    summary = {"adapter": adapter, "folder": str(out), "datasets": {}}
    for name, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / f"{name}.jsonl").write_text(text)
        summary["datasets"][name] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (tmp / "lineage.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        raise TuneloopError(f"{out} exists already; choose another --out")
    os.replace(tmp, out)
    for name, info in summary["datasets"].items():
        if info["rows"]:
            ds = registry.add_dataset(info["sha256"], str(out / f"{name}.jsonl"), info["rows"],
                                      "preference" if name == "dpo" else "chat")
            info["dataset_id"] = ds.id
    return summary
