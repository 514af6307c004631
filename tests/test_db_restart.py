"""The registry's PostgreSQL server restarted under a running `tuneloop serve`: requests made
while it is down fail at once with a 503 that says to retry (no 500, no hang), requests after it
is back succeed on the same server process, and a fine-tuning job training through the restart
ends as if nothing happened, its worker never exiting. A server of the test's own (tests/
postgres.py); skipped where PostgreSQL's server programs are not installed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from tests import postgres
from tests.conftest import make_rows, two_tenant_server, write_jsonl
from tuneloop.store import unavailable
from tuneloop.store.serving import Feedback, Job


@pytest.fixture()
def pg(monkeypatch):
    try:
        with postgres.cluster() as server:
            monkeypatch.setenv("TUNELOOP_TEST_PG_URL", server.url)  # (fresh_db_url reads it)
            yield server
    except postgres.Unavailable as exc:
        pytest.skip(str(exc))


def test_only_an_unreachable_database_counts_as_unavailable():
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    schema = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: jobs"))
    assert unavailable(locked) and not unavailable(schema)  # the second is a bug, not a blip
    assert not unavailable(ValueError("no database here"))


def test_an_answer_given_while_the_registry_is_away_is_delivered_unlogged(pg, monkeypatch):
    """A generation under way when the registry goes: logging it fails, the answer does not."""
    from types import SimpleNamespace

    from tuneloop.serve.feedback import log_completion_if_able
    from tuneloop.store import Registry

    registry = Registry(pg.url)
    who = SimpleNamespace(tenant="acme", key_id="key-1")
    target = SimpleNamespace(run_id=None)
    reply = {"id": "chatcmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert log_completion_if_able(registry, who, target, {"model": "m"}, reply, 0.1)
    pg.stop()
    assert not log_completion_if_able(registry, who, target, {"model": "m"},
                                      {**reply, "id": "chatcmpl-2"}, 0.1)
    # (a fault that is not the registry being away still raises)
    monkeypatch.setattr(registry, "session", lambda: (_ for _ in ()).throw(
        OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: completions"))))
    with pytest.raises(OperationalError):
        log_completion_if_able(registry, who, target, {"model": "m"}, reply, 0.1)


def _client(srv) -> httpx.Client:
    return httpx.Client(base_url=srv["url"], timeout=60,
                        headers={"Authorization": f"Bearer {srv['keys']['acme']}"})


CHAT = {"model": "acme-intents", "messages": [{"role": "user", "content": "my card is lost"}],
        "max_tokens": 4}


def test_requests_fail_cleanly_while_the_registry_restarts_then_succeed(tiny_model, tmp_path, pg):
    with two_tenant_server(tiny_model, tmp_path, db_kind="pg", worker=False) as srv, \
            _client(srv) as api:
        before = api.post("/v1/chat/completions", json=CHAT)
        assert before.status_code == 200, before.text
        pg.stop()
        began = time.perf_counter()
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", CHAT),
                                   ("POST", "/v1/feedback", {"completion_id": before.json()["id"],
                                                             "rating": 1})):
            reply = api.request(method, path, json=body)
            assert reply.status_code == 503, (path, reply.text)
            assert reply.json()["error"]["code"] == "registry_unavailable"
            assert int(reply.headers["retry-after"]) > 0
        assert time.perf_counter() - began < 20  # refused at once, not held until a timeout
        pg.start()
        # the same server process: the pool's dead connections are replaced as they are taken
        after = api.post("/v1/chat/completions", json=CHAT)
        assert after.status_code == 200, after.text
        for completion in (before, after):
            posted = api.post("/v1/feedback", json={"completion_id": completion.json()["id"],
                                                    "rating": 1})
            assert posted.status_code == 200, posted.text
        with srv["registry"].session() as s:
            assert s.scalar(select(func.count()).select_from(Feedback)) == 2


def test_a_job_trains_through_a_registry_restart_and_its_worker_stays_up(tiny_model, tmp_path,
                                                                         pg, monkeypatch):
    with two_tenant_server(tiny_model, tmp_path, db_kind="pg", deployed=False,
                           worker=False) as srv, _client(srv) as api:
        rows = [{"messages": [{"role": "user", "content": r["text"]},
                              {"role": "assistant", "content": r["label"]}]}
                for r in make_rows(60, seed=6)]
        with write_jsonl(tmp_path / "job.jsonl", rows).open("rb") as f:
            file_id = api.post("/v1/files", files={"file": f}, data={"purpose": "fine-tune"}
                               ).raise_for_status().json()["id"]
        job_id = api.post("/v1/fine_tuning/jobs", json={
            "model": srv["base"], "training_file": file_id,
            "hyperparameters": {"n_epochs": 40}}).raise_for_status().json()["id"]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        log = tmp_path / "worker.log"
        with log.open("w") as sink:
            worker = subprocess.Popen([sys.executable, "-m", "tuneloop.serve.worker"],
                                      stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != "running":
                assert time.time() < deadline and worker.poll() is None
                time.sleep(0.2)
            pg.stop()  # mid-training: its progress checks and lease renewals fail
            # down until the worker has met the outage (a fixed pause could fall wholly inside
            # a stretch without registry calls, such as loading the model, and prove nothing)
            while "the registry cannot be reached" not in log.read_text():
                assert time.time() < deadline and worker.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            pg.start()
            while (job := api.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in (
                    "validating_files", "queued", "running"):
                assert time.time() < deadline, job
                assert worker.poll() is None, log.read_text()[-3000:]  # it never exits
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        assert job["status"] == "succeeded", job.get("error")
        with srv["registry"].session() as s:
            assert s.get(Job, job_id).error is None
