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
from tuneloop.store import Registry, utcnow
from tuneloop.store.serving import Job


def _job(registry: Registry, job_id: str, **fields) -> Job:
    with registry.session() as s, s.begin():
        job = Job(id=job_id, tenant="acme", model="m", training_file="file-x", method={},
                  seed=0, status="queued", cancel_requested=False, **fields)
        s.add(job)
    return job


def test_a_lease_held_elsewhere_is_respected_until_it_runs_out(workspace):
    registry = Registry.open(workspace)
    soon = utcnow() + dt.timedelta(seconds=60)
    _job(registry, "job-held", worker="machine-a:11", lease_until=soon)
    assert worker.claim(registry, "machine-b:22") is None  # another host's live lease
    with registry.session() as s, s.begin():
        s.get(Job, "job-held").lease_until = utcnow() - dt.timedelta(seconds=1)
    taken = worker.claim(registry, "machine-b:22")
    assert taken.id == "job-held" and taken.worker == "machine-b:22"
    assert taken.lease_until > utcnow()
    assert not worker.renew(registry, "job-held", "machine-a:11")  # the old holder lost it
    assert worker.renew(registry, "job-held", "machine-b:22")


def test_a_dead_worker_on_this_host_loses_its_job_at_once(workspace):
    registry = Registry.open(workspace)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _job(registry, "job-orphan", worker=f"{worker.host()}:{dead.pid}",
         lease_until=utcnow() + dt.timedelta(seconds=60))
    assert worker.claim(registry, f"{worker.host()}:{os.getpid()}").id == "job-orphan"


def _start(folder, host: str) -> subprocess.Popen:
    env = dict(os.environ, TUNELOOP_WORKER_HOST=host, TUNELOOP_JOB_LEASE_S="3",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tuneloop.serve.worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _queue_job(srv, tmp_path, epochs: int) -> tuple[httpx.Client, str]:
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
        "hyperparameters": {"n_epochs": epochs}}).raise_for_status().json()["id"]
    return api, job_id


def _finish(api: httpx.Client, job_id: str, worker_process: subprocess.Popen) -> dict:
    deadline = time.time() + 300
    try:
        while api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.time() < deadline and worker_process.poll() is None
            time.sleep(0.2)
    finally:
        worker_process.terminate()
        worker_process.wait(timeout=20)
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def _events(api: httpx.Client, job_id: str) -> list[dict]:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


def test_a_job_on_a_machine_that_is_gone_moves_to_another_and_resumes(tiny_model, tmp_path):
    with two_tenant_server(tiny_model, tmp_path, deployed=False, worker=False) as srv:
        api, job_id = _queue_job(srv, tmp_path, epochs=40)
        first = _start(tmp_path, "machine-a")
        try:
            deadline = time.time() + 300
            while not api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]:
                assert time.time() < deadline and first.poll() is None
                time.sleep(0.2)
            first.send_signal(signal.SIGKILL)  # machine-a is gone, mid-run
            first.wait()
            killed_at = time.time()
            job = _finish(api, job_id, _start(tmp_path, "machine-b"))
        finally:
            first.kill()
        assert job["status"] == "succeeded", job.get("error")
        events = _events(api, job_id)
        took = [e for e in events if "taken over by machine-b" in e["message"]]
        assert took and took[0]["created_at"] >= int(killed_at) + 1  # only once the lease ran out
        assert any(e["message"].startswith("Resuming run") for e in events)


def test_a_job_whose_worker_died_before_its_first_checkpoint_trains_again(tiny_model, tmp_path):
    """Found by bench/soak.py: the job used to fail with "no intact checkpoint to resume from"."""
    with two_tenant_server(tiny_model, tmp_path, deployed=False, worker=False) as srv:
        api, job_id = _queue_job(srv, tmp_path, epochs=1)
        registry = srv["registry"]
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        run = registry.add_run(task="chat", base_model=srv["base"], method="lora",
                               status="running", recipe={})
        with registry.session() as s, s.begin():  # as a worker leaves it when killed early
            job = s.get(Job, job_id)
            job.status, job.run_id, job.worker = "running", run.id, f"{worker.host()}:{dead.pid}"
        job = _finish(api, job_id, _start(tmp_path, worker.host()))
        assert job["status"] == "succeeded", job.get("error")
        assert any("before its first checkpoint" in e["message"] for e in _events(api, job_id))
        assert registry.get_run(run.id).status == "failed"
