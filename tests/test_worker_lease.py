"""A job's claim is a lease: a worker on another machine that is gone loses its job when the
lease runs out, and another worker resumes it from its checkpoint (simulated here by workers
that report other host names); a live worker renews its lease and keeps the job."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

import httpx2 as httpx

from tests.conftest import make_rows, two_tenant_server, write_jsonl
from tuneloop.serve import worker
from tuneloop.store import Registry, _now
from tuneloop.store.serving import Job


def _job(registry: Registry, job_id: str, **fields) -> Job:
    with registry.session() as s, s.begin():
        job = Job(id=job_id, tenant="acme", model="m", training_file="file-x", method={},
                  seed=0, status="queued", cancel_requested=False, **fields)
        s.add(job)
    return job


def test_a_lease_held_elsewhere_is_respected_until_it_runs_out(workspace):
    registry = Registry.open(workspace)
    soon = _now() + dt.timedelta(seconds=60)
    _job(registry, "job-held", worker="machine-a:11", lease_until=soon)
    assert worker.claim(registry, "machine-b:22") is None  # another host's live lease
    with registry.session() as s, s.begin():
        s.get(Job, "job-held").lease_until = _now() - dt.timedelta(seconds=1)
    taken = worker.claim(registry, "machine-b:22")
    assert taken.id == "job-held" and taken.worker == "machine-b:22"
    assert taken.lease_until > _now()
    assert not worker.renew(registry, "job-held", "machine-a:11")  # the old holder lost it
    assert worker.renew(registry, "job-held", "machine-b:22")


def test_a_dead_worker_on_this_host_loses_its_job_at_once(workspace):
    registry = Registry.open(workspace)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _job(registry, "job-orphan", worker=f"{worker.host()}:{dead.pid}",
         lease_until=_now() + dt.timedelta(seconds=60))
    assert worker.claim(registry, f"{worker.host()}:{os.getpid()}").id == "job-orphan"


def _start(folder, host: str) -> subprocess.Popen:
    env = dict(os.environ, TUNELOOP_WORKER_HOST=host, TUNELOOP_JOB_LEASE_S="3",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tuneloop.serve.worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_job_on_a_machine_that_is_gone_moves_to_another_and_resumes(tiny_model, tmp_path):
    with two_tenant_server(tiny_model, tmp_path, deployed=False, worker=False) as srv:
        api = httpx.Client(base_url=srv["url"], timeout=60,
                           headers={"Authorization": f"Bearer {srv['keys']['acme']}"})
        rows = [{"messages": [{"role": "user", "content": r["text"]},
                              {"role": "assistant", "content": r["label"]}]}
                for r in make_rows(60, seed=6)]
        with write_jsonl(tmp_path / "lease.jsonl", rows).open("rb") as f:
            file_id = api.post("/v1/files", files={"file": f},
                               data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
        job_id = api.post("/v1/fine_tuning/jobs", json={
            "model": srv["base"], "training_file": file_id,
            "hyperparameters": {"n_epochs": 40}}).raise_for_status().json()["id"]
        first = _start(tmp_path, "machine-a")
        try:
            deadline = time.time() + 300
            while not api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]:
                assert time.time() < deadline and first.poll() is None
                time.sleep(0.2)
            first.send_signal(signal.SIGKILL)  # machine-a is gone, mid-run
            first.wait()
            killed_at = time.time()
            second = _start(tmp_path, "machine-b")
            try:
                while api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] not in (
                        "succeeded", "failed", "cancelled"):
                    assert time.time() < deadline + 300 and second.poll() is None
                    time.sleep(0.2)
            finally:
                second.terminate()
                second.wait(timeout=20)
        finally:
            first.kill()
        job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job.get("error")
        events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                         params={"limit": 100}).json()["data"]
        took = [e for e in events if "taken over by machine-b" in e["message"]]
        assert took and took[0]["created_at"] >= int(killed_at) + 1  # only once the lease ran out
        assert any(e["message"].startswith("Resuming run") for e in events)
