"""Promotion and keys: a run is deployed only with evidence, rollback walks back the history,
keys are stored hashed and printed once (on SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import pytest

from tests.conftest import DB_KINDS, fresh_db_url
from tests.test_cli import assert_user_error, tl
from tuneloop.errors import TuneloopError
from tuneloop.serve.auth import create_key, hash_key, list_keys, lookup, revoke_key
from tuneloop.serve.deploy import deploy, deployed_history, events, rollback
from tuneloop.store import Registry


@pytest.fixture(params=DB_KINDS)
def registry(request, tmp_path):
    return Registry(fresh_db_url(request.param, tmp_path))


def add_run(registry, test_ds, accuracy, passed=True, gate=True):
    metrics = {"accuracy": accuracy}
    if gate:
        metrics["gate"] = {"metric": "accuracy", "best_baseline": "few-shot", "best_baseline_value": 0.4,
                           "run_value": accuracy, "gain": accuracy - 0.4, "margin": 0.02, "passed": passed}
    run = registry.add_run(task="classify", base_model="m", method="lora", status="done",
                           recipe={}, test_dataset=test_ds, metrics=metrics, adapter_path="/a")
    registry.add_evaluation(run_id=run.id, model=run.id, dataset=test_ds, strategy="fine-tuned",
                            task="classify", metrics={"accuracy": accuracy})
    return run


def test_promotion_needs_a_passed_gate_and_a_better_score_on_the_same_test_set(registry):
    test = registry.add_dataset("ab" * 32, "/t.jsonl", 10, "classify").id
    first, worse, better = (add_run(registry, test, a) for a in (0.7, 0.65, 0.8))
    failed = add_run(registry, test, 0.5, passed=False)
    ungated = add_run(registry, test, 0.9, gate=False)
    with pytest.raises(TuneloopError, match="did not pass its gate"):
        deploy(registry, "intents", failed.id, "acme")
    with pytest.raises(TuneloopError, match="no evaluation gate"):
        deploy(registry, "intents", ungated.id, "acme")
    deploy(registry, "intents", first.id, "acme")
    with pytest.raises(TuneloopError, match="does not beat"):
        deploy(registry, "intents", worse.id, "acme")
    event = deploy(registry, "intents", better.id, "acme")
    assert event.previous_run_id == first.id and "0.800 > 0.700" in event.reason
    deploy(registry, "intents", worse.id, "acme", force=True)
    assert deployed_history(registry, "intents", "acme") == [first.id, better.id, worse.id]
    assert rollback(registry, "intents", "acme").run_id == better.id
    assert rollback(registry, "intents", "acme").run_id == first.id
    with pytest.raises(TuneloopError, match="no earlier run"):
        rollback(registry, "intents", "acme")
    assert [e.action for e in events(registry, "intents")] == ["deploy"] * 3 + ["rollback"] * 2
    with pytest.raises(TuneloopError, match="taken by another tenant"):
        deploy(registry, "intents", better.id, "globex")


def test_keys_are_stored_hashed_and_revocation_is_immediate(registry):
    row, secret = create_key(registry, "acme", rate_per_minute=5)
    assert secret.startswith("tl-") and row.sha256 == hash_key(secret) and secret not in row.prefix * 2
    assert lookup(registry, secret).tenant == "acme" and lookup(registry, secret + "x") is None
    revoke_key(registry, row.id)
    assert lookup(registry, secret) is None
    assert [k.id for k in list_keys(registry, "acme")] == [row.id]
    with pytest.raises(TuneloopError, match="not valid"):
        create_key(registry, "Not A Tenant")


def test_keys_cli_prints_the_key_alone_on_its_last_line(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path / "ws"), "TUNELOOP_DB_URL": ""}
    made = tl("keys", "create", "--tenant", "acme", "--rate", "30", env=env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    registry = Registry.open(tmp_path / "ws")
    assert lookup(registry, secret).rate_per_minute == 30
    listed = tl("keys", "list", "--json", env=env)
    assert secret not in listed.stdout and secret[:10] in listed.stdout
    assert_user_error(tl("deploy", "x", "--run", "run-nope", env=env), "no run 'run-nope'")
    assert_user_error(tl("rollback", "x", env=env), "no earlier run")
    assert_user_error(tl("feedback", "export", "--adapter", "x", env=env), "no feedback on 'x'")


def test_serve_command_answers_on_its_port(tiny_model, tmp_path):
    import socket
    import subprocess
    import time

    import httpx2 as httpx

    from tests.test_cli import EXE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "TUNELOOP_HOME": str(tmp_path / "ws"), "TUNELOOP_DB_URL": ""}
    proc = subprocess.Popen([EXE, "serve", "--port", str(port), "--base", str(tiny_model),
                             "--no-auth", "--no-worker"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": str(tiny_model), "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status says why it ended
    assert proc.returncode in (0, -15) and "Traceback" not in output
    assert "Finished server process" in output


def test_request_log_retention_keeps_rows_with_feedback(registry):
    import datetime as dt

    from tuneloop.serve.feedback import apply_retention
    from tuneloop.store.serving import Completion, Feedback

    old = dt.datetime(2020, 1, 1)
    with registry.session() as s, s.begin():
        for cid, created in (("c-old", old), ("c-old-rated", old), ("c-new", None)):
            s.add(Completion(id=cid, tenant="t", model="m", request={}, response={"choices": []},
                             prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                             **({"created": created} if created else {})))
        s.add(Feedback(id="fb-1", completion_id="c-old-rated", tenant="t", kind="rating", choice=0, rating=1))
    assert apply_retention(registry, days=30) == 1
    with registry.session() as s:
        assert sorted(c.id for c in s.query(Completion)) == ["c-new", "c-old-rated"]
