"""The fine-tuning job worker: `python -m tuneloop.serve.worker` (started by `tuneloop serve`).

It claims one job at a time from the registry, so any number of API restarts (or several
workers on one database) never lose or double-run a job. A job whose worker died mid-run is
taken up again and resumes from its run's newest checkpoint.

A claim is a lease (`LEASE_S`, renewed a few times within it while the worker works): a worker
on this host that has died loses its job at once (its process is gone); one on another host,
whose process cannot be seen from here, loses it when its lease runs out. A worker that finds
its lease taken stops working on the job without touching it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

import psutil

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from tuneloop import methods, project
from tuneloop.data.validate import validate
from tuneloop.errors import TuneloopError
from tuneloop.serve.deploy import deploy
from tuneloop.serve.jobs import STARTS, add_event, job_recipe
from tuneloop.store import Registry, unavailable, utcnow
from tuneloop.store.serving import Job
from tuneloop.train import checkpoint
from tuneloop.train.run import Stopped, train

log = logging.getLogger("tuneloop.worker")
ACTIVE = ("validating_files", "queued", "running")
LEASE_S = float(os.environ.get("TUNELOOP_JOB_LEASE_S", "60"))


class LostLease(Exception):
    """Another worker holds this job now (this one's lease ran out): leave it to that one."""


def host() -> str:
    """This worker's host name ($TUNELOOP_WORKER_HOST where host names are not unique)."""
    return os.environ.get("TUNELOOP_WORKER_HOST") or socket.gethostname()


def _alive(worker: str | None, lease_until: dt.datetime | None = None) -> bool:
    """Whether the worker holding a job (id host:pid) still holds it: on this host, while its
    process lives (a zombie, dead but not yet reaped, is dead); elsewhere, while its lease runs."""
    if not worker:
        return False
    where, _, pid = worker.rpartition(":")
    if where != host():
        return lease_until is not None and lease_until > utcnow()
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def _lease() -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=LEASE_S)


def renew(registry: Registry, job_id: str, me: str) -> bool:
    """Extend this worker's lease on a job; False if another worker has taken it."""
    with registry.session() as s, s.begin():
        return s.execute(update(Job).where(Job.id == job_id, Job.worker == me)
                         .values(lease_until=_lease())).rowcount == 1


class Heartbeat:
    """Renews a job's lease in the background while the worker trains; `lost` is set (and the
    next progress callback stops the job) once another worker holds it."""

    def __init__(self, registry: Registry, job_id: str, me: str):
        self.lost, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(registry, job_id, me),
                                        daemon=True)

    def _beat(self, registry, job_id, me):
        while not self._done.wait(LEASE_S / 4):
            try:
                if not renew(registry, job_id, me):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 — the database is away: retry on the next beat
                log.warning("could not renew the lease on job %s", job_id, exc_info=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)


def claim(registry: Registry, me: str) -> Job | None:
    """Take the oldest active job that no live worker holds (a conditional update: one winner)."""
    with registry.session() as s:
        jobs = list(s.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.created)))
    for job in jobs:  # (one of this worker's own is one it left when the registry went away)
        if job.worker != me and _alive(job.worker, job.lease_until):
            continue
        with registry.session() as s, s.begin():
            won = s.execute(update(Job).where(Job.id == job.id, Job.status == job.status,
                                              (Job.worker == job.worker) if job.worker else
                                              Job.worker.is_(None))
                            .values(worker=me, lease_until=_lease())).rowcount == 1
        if won:
            if job.worker and job.worker != me:
                add_event(registry, job.id, f"Worker {job.worker} stopped; job taken over by {me}")
            with registry.session() as s:
                return s.get(Job, job.id)
    return None


def _set(registry: Registry, job_id: str, **fields) -> Job:
    with registry.session() as s, s.begin():
        job = s.get(Job, job_id)
        for key, value in fields.items():
            setattr(job, key, value)
        return job


def fine_tuned_name(job: Job) -> str:
    base = job.model.rstrip("/").rsplit("/", 1)[-1]
    return f"ft:{base}:{job.tenant}:{job.suffix or ''}:{job.id.rsplit('-', 1)[-1]}"


def process(registry: Registry, job: Job, workspace, lost: threading.Event | None = None) -> None:
    """Take one claimed job to a final state (or leave it, untouched, once `lost` is set)."""
    try:
        recipe = job_recipe(registry, job)
        if job.status == "validating_files":
            # preference pairs are checked as pairs, answers as the task's rows
            task = recipe.task if methods.method(recipe.method).trains_on == "answers" else None
            for param, path in (("training_file", recipe.data.train),
                                ("validation_file", recipe.data.validation)):
                if path:
                    report = validate(path, task, model=job.model)
                    if not report.ok:
                        first = report.problems[0]
                        raise TuneloopError(f"{param} line {first.line}: {first.message}")
            job = _set(registry, job.id, status="queued")
            add_event(registry, job.id, "Files validated; job queued")
        job = _set(registry, job.id, status="running", started=job.started or utcnow())
        resume = job.run_id
        if resume and checkpoint.latest(Path(workspace) / "runs" / resume / "checkpoints") is None:
            registry.update_run(resume, status="failed", error="its worker stopped before the "
                                "first checkpoint; the job trains a new run")
            add_event(registry, job.id, f"Run {resume} stopped before its first checkpoint; "
                      "training a new run from the start")
            resume = None
        add_event(registry, job.id, STARTS[0] if not resume else
                  f"{STARTS[1]} {resume} from its newest checkpoint")

        def progress(step, steps, loss, tokens_per_s):
            if lost is not None and lost.is_set():
                raise LostLease()
            try:
                with registry.session() as s:
                    cancel = s.get(Job, job.id).cancel_requested
                if step == 1 or step == steps or step % max(1, steps // 20) == 0:
                    add_event(registry, job.id, f"Step {step}/{steps}: training loss={loss:.4f}",
                              data={"step": step, "total_steps": steps, "train_loss": loss,
                                    "tokens_per_s": tokens_per_s})
            except DBAPIError as exc:  # the registry restarting: train on, ask again next step
                if not unavailable(exc):
                    raise
                log.warning("job %s step %d: the registry cannot be reached; training on", job.id,
                            step)
                return
            if cancel:
                raise Stopped("cancelled by the client")

        result = train(recipe, workspace=workspace, progress=progress, resume=resume,
                       on_run=lambda run_id: _set(registry, job.id, run_id=run_id))
        name = fine_tuned_name(job)
        deploy(registry, name, result["run_id"], job.tenant, force=True,
               reason=f"fine-tuning job {job.id}")
        _set(registry, job.id, status="succeeded", fine_tuned_model=name, finished=utcnow(),
             trained_tokens=int(result.get("train_tokens", 0)))
        add_event(registry, job.id, f"New fine-tuned model created: {name}")
        add_event(registry, job.id, "The job has successfully completed")
    except LostLease:
        log.warning("job %s: another worker holds it now; leaving it to that one", job.id)
    except Stopped:
        _set(registry, job.id, status="cancelled", finished=utcnow())
        add_event(registry, job.id, "Job cancelled")
    except TuneloopError as exc:
        _fail(registry, job, "invalid_training_file" if job.status == "validating_files"
              else "training_error", str(exc))
    except Exception as exc:  # noqa: BLE001  a worker outlives any one job's failure
        if unavailable(exc):  # not the job's fault: it is left running, to be taken up again
            raise
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        _fail(registry, job, "internal_error", f"{type(exc).__name__}: {exc}")


def _fail(registry: Registry, job: Job, code: str, message: str) -> None:
    param = "training_file" if code == "invalid_training_file" else None
    _set(registry, job.id, status="failed", finished=utcnow(),
         error={"code": code, "message": message[:2000], "param": param})
    add_event(registry, job.id, message[:2000], level="error")


def main(poll_s: float = 0.5) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    workspace = project.workspace()
    registry = Registry.open(workspace)
    me = f"{host()}:{os.getpid()}"
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt  # leaves the job running for the next worker to resume

    signal.signal(signal.SIGTERM, stop)
    log.info("worker %s polling %s", me, registry.url.split("@")[-1])
    away = 0  # polls in a row that found the registry unreachable
    try:
        while not stopping:
            try:
                job = claim(registry, me)
                if job is None:
                    time.sleep(poll_s)
                    continue
                log.info("job %s: %s", job.id, job.status)
                with Heartbeat(registry, job.id, me) as beat:
                    process(registry, job, workspace, beat.lost)
                away = 0
            except DBAPIError as exc:  # restarting or down: wait for it, jobs left as they are
                if not unavailable(exc):
                    raise
                away += 1
                log.warning("the registry cannot be reached (%s); trying again", exc.orig)
                time.sleep(min(poll_s * 2 ** min(away, 6), 30.0))
    except KeyboardInterrupt:
        log.info("worker %s stopped", me)


if __name__ == "__main__":
    main()
