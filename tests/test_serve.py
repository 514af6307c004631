"""The OpenAI-compatible server, started for real on loopback and driven by the official
`openai` client: chat (streamed and not), JSON-schema output, tenants kept apart, feedback
into datasets, and bad requests that get the right error while the server keeps serving.
Runs against SQLite, and PostgreSQL too when $TUNELOOP_TEST_PG_URL is set."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx2 as httpx
import jsonschema
import openai
import pytest

from tests.conftest import DB_KINDS, make_rows, two_tenant_server, write_jsonl
from tuneloop.serve.app import running
from tuneloop.core.formats import load_examples
from tuneloop.serve.app import Settings
from tuneloop.serve.auth import create_key, revoke_key
from tuneloop.serve.feedback import export
from tuneloop.store import Registry


METRICS_TOKEN = "operator-scrape-token"


@pytest.fixture(scope="module", params=DB_KINDS)
def server(request, tiny_model, tmp_path_factory):
    """A server with two tenants, each with its own deployed LoRA run on the tiny base."""
    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("serve"), request.param,
                           max_body_bytes=64 * 1024, max_tokens_limit=200, worker=True,
                           metrics_token=METRICS_TOKEN) as srv:
        yield srv


def client(server, tenant="acme", **kw):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["keys"][tenant],
                         max_retries=0, **kw)


def test_chat_streamed_equals_chat_collected(server):
    c = client(server)
    ask = dict(model="acme-intents", messages=[{"role": "user", "content": "i lost my card today"}],
               max_tokens=12, temperature=0)
    whole = c.chat.completions.create(**ask)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10  # task prompt added
    pieces, finish, usage = [], None, None
    for chunk in c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.total_tokens == whole.usage.total_tokens
    two = c.chat.completions.create(**{**ask, "temperature": 1.0}, n=2, seed=1)
    assert [ch.index for ch in two.choices] == [0, 1]
    text = c.completions.create(model=server["base"], prompt="my top up", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 5


def test_json_schema_output_always_validates(server):
    schema = {"type": "object", "properties": {"intent": {"enum": ["card_lost", "top_up", "other"]},
                                               "urgent": {"type": "boolean"}},
              "required": ["intent", "urgent"], "additionalProperties": False}
    reply = client(server).chat.completions.create(
        model="acme-intents", messages=[{"role": "user", "content": "cannot add money"}],
        response_format={"type": "json_schema", "json_schema": {"name": "intent", "schema": schema}},
        max_tokens=60, temperature=0.7, seed=5, n=3)
    for choice in reply.choices:  # a barely trained tiny model, yet every reply validates
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"


def test_tenants_see_and_call_only_their_own_models(server):
    acme, globex = client(server, "acme"), client(server, "globex")
    assert {m.id for m in acme.models.list()} == {server["base"], "acme-intents"}
    assert {m.id for m in globex.models.list()} == {server["base"], "globex-intents"}
    with pytest.raises(openai.NotFoundError) as caught:  # exists, but not for this tenant
        acme.chat.completions.create(model="globex-intents", messages=[{"role": "user", "content": "x"}])
    assert "globex-intents" in str(caught.value) and "acme" not in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve("globex-intents")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="tl-wrong", max_retries=0).models.list()
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    row, secret = create_key(server["registry"], "acme")
    assert openai.OpenAI(base_url=server["url"] + "/v1", api_key=secret).models.list().data
    revoke_key(server["registry"], row.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key=secret, max_retries=0).models.list()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, headers = server["url"], {"authorization": f"Bearer {server['keys']['acme']}"}
    bad_json = httpx.post(url + "/v1/chat/completions", content=b'{"model": "x",',
                          headers={**headers, "content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url + "/v1/chat/completions", headers=headers,
                      content=json.dumps({"model": "acme-intents", "messages": [
                          {"role": "user", "content": "x" * 100_000}]}).encode())
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    big_headers = httpx.get(url + "/v1/models", headers={**headers, "x-big": "a" * 100_000})
    assert big_headers.status_code == 431
    # The same head sent in pieces, as a slow network delivers it, still gets the 431.
    host, port = url.removeprefix("http://").split(":")
    head = (f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\nauthorization: {headers['authorization']}"
            f"\r\nx-big: {'a' * 40_000}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for i in range(0, len(head), 4096):
            sock.sendall(head[i:i + 4096])
            time.sleep(0.01)
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")
    c = client(server)
    msg = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=msg)
    with pytest.raises(openai.BadRequestError) as too_many:
        c.chat.completions.create(model="acme-intents", messages=msg, max_tokens=10**6)
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as missing:
        c.chat.completions.create(model="acme-intents", messages=[])
    assert missing.value.body["param"] == "messages"
    # A client that goes away mid-stream frees its rows; the next request is served.
    body = {"model": "acme-intents", "messages": msg, "max_tokens": 150, "stream": True, "temperature": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        next(r.iter_lines())
    for _ in range(100):  # the abandoned rows leave the batch
        engines = httpx.get(url + "/health").json()["engines"]
        if all(e["running"] == 0 for e in engines.values()):
            break
        time.sleep(0.05)
    assert all(e["running"] == 0 for e in engines.values())
    after = c.chat.completions.create(model="acme-intents", messages=msg, max_tokens=4)
    assert after.choices[0].message.role == "assistant"
    assert httpx.get(url + "/metrics").status_code == 401  # a tenant's traffic is its own
    metrics = httpx.get(url + "/metrics", headers=headers).text
    assert 'tuneloop_requests_total{model="acme-intents",status="ok",tenant="acme"}' in metrics
    theirs = httpx.get(url + "/metrics", headers={
        "authorization": f"Bearer {server['keys']['globex']}"}).text
    assert "acme" not in theirs and "tuneloop_queue_depth" in theirs
    every = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'tenant="acme"' in every
    assert "tuneloop_queue_depth" in metrics
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_request_out_of_bounds_is_refused_alone_while_other_tenants_are_served(server):
    """Seeds beyond int64 (which once failed every generation in the batch) and other numbers
    past their bounds answer 400 naming the field, while another tenant's streamed reply in
    flight completes; a chunked body over the limit answers 413 like a declared one."""
    url = server["url"]
    headers = {"authorization": f"Bearer {server['keys']['acme']}"}
    msg = [{"role": "user", "content": "hello"}]
    done = {}

    def stream_globex():
        with client(server, "globex").chat.completions.create(
                model="globex-intents", messages=msg, max_tokens=40, temperature=1, seed=3,
                stream=True) as chunks:
            done["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    other = threading.Thread(target=stream_globex)
    other.start()
    for field, value in (("seed", 2**64), ("seed", -(2**63) - 1), ("n", 10**30),
                         ("max_tokens", -1), ("temperature", 1e309)):
        body = json.dumps({"model": "acme-intents", "messages": msg, field: value})
        r = httpx.post(url + "/v1/chat/completions", headers={
            **headers, "content-type": "application/json"},
            content=body.replace("Infinity", "1e309"))
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field
    edge = client(server).chat.completions.create(model="acme-intents", messages=msg,
                                                  max_tokens=3, temperature=1, seed=2**63 - 1)
    assert edge.choices[0].finish_reason in ("stop", "length")
    other.join(timeout=60)
    assert done["finish"] in ("stop", "length")

    def chunked():
        yield b'{"model": "acme-intents", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", headers={
        **headers, "content-type": "application/json"}, content=chunked())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    small = httpx.post(url + "/v1/chat/completions", headers={
        **headers, "content-type": "application/json"}, content=iter([json.dumps(
            {"model": "acme-intents", "messages": msg, "max_tokens": 2}).encode()]))
    assert small.status_code == 200, small.text


def test_a_schema_over_openais_limits_is_refused_before_anything_compiles(server):
    """Schemas built to hurt a grammar compiler (a 20,000-value enum took 17 s of a core to
    compile, 256 levels of nesting 10 s) answer 400 at once, naming the field and the limit;
    a schema at the limits is served."""
    c = client(server)
    deep: dict = {"type": "string"}
    for _ in range(256):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    hostile = {"levels of nesting": deep,
               "enum values": {"enum": [f"v{i}" for i in range(2000)]},
               "characters in one enum": {"enum": ["x" * 60 + str(i) for i in range(300)]}}
    for what, schema in hostile.items():
        began = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(
                model=server["base"], messages=[{"role": "user", "content": "go"}], max_tokens=4,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": schema}})
        error = refused.value.body
        assert error["param"] == "response_format.json_schema.schema", error
        assert what in error["message"] and "over the limit" in error["message"], error
        assert time.perf_counter() - began < 5
    at_limits: dict = {"enum": [f"v{i}" for i in range(1000)]}
    for _ in range(9):
        at_limits = {"type": "object", "properties": {"x": at_limits}, "required": ["x"]}
    reply = c.chat.completions.create(
        model=server["base"], messages=[{"role": "user", "content": "go"}], max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": at_limits}})
    assert reply.choices[0].message.content.startswith('{"x":')


def test_a_schema_that_compiles_too_long_is_refused_and_others_are_not_held(tiny_model, tmp_path,
                                                                            monkeypatch):
    """A compile past the server's deadline answers 400 (make it simpler) and goes on in the
    background, one at a time: a second new schema meanwhile answers 503 (retry) within the
    deadline and stops waiting (nothing piles up behind a compile), a request without a schema
    is served at once, and the first schema, compiled by then, is served from the cache."""
    import time

    from tuneloop.tasks import extract

    compile_schema, compiled = extract.compile_schema, []

    def slow(compiler, schema_text):
        compiled.append(json.loads(schema_text)["required"][0])
        time.sleep(1.5)  # as a schema full of optional properties does on a real vocabulary
        return compile_schema(compiler, schema_text)

    monkeypatch.setattr(extract, "compile_schema", slow)
    with two_tenant_server(tiny_model, tmp_path, deployed=False, worker=False,
                           grammar_timeout_s=0.5) as srv:
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key=srv["keys"]["acme"])
        ask = dict(model=srv["base"], messages=[{"role": "user", "content": "go"}], max_tokens=8)

        def shaped(name):
            return {"type": "json_schema", "json_schema": {"name": name, "schema": {
                "type": "object", "properties": {name: {"type": "string"}}, "required": [name]}}}

        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(**ask, response_format=shaped("first"))
        assert refused.value.body["code"] == "schema_too_complex"
        began = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as busy:  # (503)
            c.with_options(max_retries=0).chat.completions.create(
                **ask, response_format=shaped("second"))
        assert busy.value.body["code"] == "compiler_busy" and time.perf_counter() - began < 1.2
        plain = c.chat.completions.create(**ask)
        assert time.perf_counter() - began < 1.2 and plain.choices[0].finish_reason
        time.sleep(1.5)  # the first compile has ended: kept, it is served at once
        began = time.perf_counter()
        reply = c.chat.completions.create(**ask, response_format=shaped("first"))
        assert reply.choices[0].message.content.startswith('{"first"')
        assert time.perf_counter() - began < 1.2
        assert compiled == ["first"]  # the second gave up waiting: no compile left behind


def test_a_deployed_classifier_answers_only_its_labels_with_a_confidence(server):
    """A classification adapter's reply is one of its labels (decoded within the label set)
    and carries the label's probability; below a review threshold it answers needs_review,
    streamed or not."""
    from tests.conftest import LABELS

    c = client(server)
    ask = dict(model="acme-intents", messages=[{"role": "user", "content": "hello there friend"}],
               max_tokens=40)
    for temperature in (0, 1.5):
        reply = c.chat.completions.create(**ask, temperature=temperature, n=3, seed=4)
        for choice in reply.choices:
            assert choice.message.content in LABELS and choice.finish_reason == "stop"
            assert 0.0 < choice.model_extra["confidence"] <= 1.0
    short = c.chat.completions.create(**{**ask, "max_tokens": 1}, stop=["_"], temperature=0)
    assert short.choices[0].message.content in LABELS  # a label is answered whole
    review = c.chat.completions.create(**ask, temperature=0, extra_body={"review_below": 1.0})
    assert review.choices[0].message.content == "needs_review"
    streamed = c.chat.completions.create(**ask, temperature=0, stream=True,
                                         extra_body={"review_below": 1.0})
    chunks = [ch for ch in streamed if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "needs_review"
    assert 0.0 < chunks[-1].choices[0].model_extra["confidence"] < 1.0
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(**ask, extra_body={"review_below": 2})
    assert bad.value.body["param"] == "review_below"


def test_feedback_round_trip_into_sft_and_dpo_datasets(server):
    c = client(server)
    msg = [{"role": "user", "content": "my card was stolen yesterday"}]
    first = c.chat.completions.create(model="acme-intents", messages=msg, max_tokens=6, temperature=1, seed=1)
    second = c.chat.completions.create(model="acme-intents", messages=msg, max_tokens=6, temperature=1, seed=2)
    post = lambda body: c.post("/feedback", cast_to=object, body=body)  # the SDK's raw request
    post({"completion_id": first.id, "rating": 1})
    post({"completion_id": second.id, "correction": "card_lost"})
    post({"completion_id": first.id, "preferred_over": second.id})
    with pytest.raises(openai.NotFoundError):  # another tenant's completion is not there for globex
        client(server, "globex").post("/feedback", cast_to=object,
                                      body={"completion_id": first.id, "rating": 1})
    summary = export(server["registry"], "acme-intents", server["folder"] / "fb-export")
    sft = load_examples(server["folder"] / "fb-export" / "sft.jsonl", "chat")
    assert [e.answer for e in sft][-1] == "card_lost" and len(sft) == 2
    dpo_rows = [json.loads(line) for line in (server["folder"] / "fb-export" / "dpo.jsonl").open()]
    assert all(r["completion_id"] in (first.id, second.id) for r in dpo_rows)
    assert summary["datasets"]["sft"]["dataset_id"].startswith("ds-")


def test_feedback_under_concurrent_load_is_never_lost(server):
    c = client(server)
    reply = c.chat.completions.create(model="acme-intents", messages=[{"role": "user", "content": "rate"}],
                                      max_tokens=2)
    failures = []

    def send(i):
        try:
            httpx.post(server["url"] + "/v1/feedback", timeout=60,
                       headers={"authorization": f"Bearer {server['keys']['acme']}"},
                       json={"completion_id": reply.id, "rating": 1 if i % 2 else -1}).raise_for_status()
        except Exception as exc:  # collected: the assertion below names them
            failures.append(repr(exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from sqlalchemy import func, select

    from tuneloop.store.serving import Feedback

    with server["registry"].session() as s:
        stored = s.scalar(select(func.count()).select_from(Feedback).where(Feedback.completion_id == reply.id))
    assert failures == [] and stored == 120


def chat_rows(n, seed):
    return [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in make_rows(n, seed)]


def wait_for(c, job_id, states, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def test_fine_tuning_job_from_an_uploaded_file_then_answers_by_its_ft_name(server):
    c = client(server, "globex")
    path = write_jsonl(server["folder"] / "upload.jsonl", chat_rows(24, seed=3))
    uploaded = c.files.create(file=path.open("rb"), purpose="fine-tune")
    assert uploaded.id in [f.id for f in c.files.list().data]
    assert client(server, "acme").files.list().data == []  # files are per tenant
    job = c.fine_tuning.jobs.create(model=server["base"], training_file=uploaded.id, suffix="intents",
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
                                    seed=3, metadata={"team": "support"})
    assert job.status == "validating_files" and job.metadata == {"team": "support"}
    done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:") and ":globex:intents:" in done.fine_tuned_model
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert "The job has successfully completed" in messages and any("Step" in m for m in messages)
    reply = c.chat.completions.create(model=done.fine_tuned_model, max_tokens=5,
                                      messages=[{"role": "user", "content": "i lost my card"}])
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.role == "assistant"
    assert done.fine_tuned_model in [m.id for m in c.models.list().data]
    assert done.id in [j.id for j in c.fine_tuning.jobs.list().data]
    assert c.files.delete(uploaded.id).deleted


def test_a_job_takes_recipe_keys_checked_when_it_is_created(server):
    c = client(server, "globex")
    path = write_jsonl(server["folder"] / "recipe-job.jsonl", chat_rows(24, seed=5))
    file_id = c.files.create(file=path.open("rb"), purpose="fine-tune").id
    for recipe, says in (("lora: {rank: 4\nepochs: 2", "not valid YAML at line"),
                         ({"base_model": "other"}, "recipe.base_model is set by the job"),
                         ("lora: {rnak: 4}", "did you mean 'rank'"),
                         ("- epochs", "must be a mapping")):
        with pytest.raises(openai.BadRequestError) as caught:
            c.fine_tuning.jobs.create(model=server["base"], training_file=file_id,
                                      extra_body={"recipe": recipe})
        assert says in caught.value.body["message"] and caught.value.body["param"] == "recipe"
    before = {j.id for j in c.fine_tuning.jobs.list(limit=100).data}
    job = c.fine_tuning.jobs.create(model=server["base"], training_file=file_id,
                                    extra_body={"recipe": "lora: {rank: 4}\nmax_steps: 3\n"})
    assert before == {j.id for j in c.fine_tuning.jobs.list(limit=100).data} - {job.id}  # none kept
    done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    run = server["registry"].get_run(_job_run(server, job.id))
    assert run.recipe["lora"]["rank"] == 4 and run.recipe["max_steps"] == 3
    settings = httpx.get(f"{server['url']}/v1/tuneloop/jobs/{job.id}/recipe",
                         headers={"authorization": f"Bearer {server['keys']['globex']}"}).json()
    assert settings["resolved"] and "rank: 4" in settings["yaml"] and "\nplan:\n" in settings["yaml"]
    assert f"train: {file_id}\n" in settings["yaml"]  # the file's id, not a server path
    assert httpx.get(f"{server['url']}/v1/tuneloop/jobs/{job.id}/recipe", headers={
        "authorization": f"Bearer {server['keys']['acme']}"}).status_code == 404  # not acme's job


def _job_run(server, job_id):
    from tuneloop.store.serving import Job

    with server["registry"].session() as s:
        return s.get(Job, job_id).run_id


def test_a_running_jobs_finish_is_estimated_from_its_pace(tmp_path):
    import datetime as dt

    from tuneloop.serve.jobs import estimated_finish
    from tuneloop.store.serving import Job, JobEvent

    registry = Registry.open(tmp_path / "ws")
    start = dt.datetime(2026, 1, 1, 12, 0, 0)
    with registry.session() as s, s.begin():
        s.add(Job(id="ftjob-pace", tenant="t", model="m", training_file="file-x",
                  method={"type": "supervised", "supervised": {"hyperparameters": {}}}, seed=1,
                  status="running", cancel_requested=False))
    with registry.session() as s:
        job = s.get(Job, "ftjob-pace")
    assert estimated_finish(registry, job) is None  # no pace yet
    with registry.session() as s, s.begin():
        s.add(JobEvent(job_id=job.id, level="info", message="started", created=start))
        for step, seconds in ((1, 10), (5, 30)):  # 4 steps in 20 s: 5 s a step
            s.add(JobEvent(job_id=job.id, level="info", message=f"Step {step}/25",
                           data={"step": step, "total_steps": 25, "train_loss": 1.0},
                           created=start + dt.timedelta(seconds=seconds)))
    last = int((start + dt.timedelta(seconds=30)).replace(tzinfo=dt.timezone.utc).timestamp())
    assert estimated_finish(registry, job) == last + 20 * 5
    with registry.session() as s, s.begin():  # a worker died; the next resumes an hour later
        later = start + dt.timedelta(hours=1)
        s.add(JobEvent(job_id=job.id, level="info", message="Resuming run run-x from its newest "
                       "checkpoint", created=later))
        for step, seconds in ((6, 10), (8, 30)):  # 2 steps in 20 s: 10 s a step
            s.add(JobEvent(job_id=job.id, level="info", message=f"Step {step}/25",
                           data={"step": step, "total_steps": 25, "train_loss": 1.0},
                           created=later + dt.timedelta(seconds=seconds)))
    assert estimated_finish(registry, job) == last + 3600 + 17 * 10
    job.status = "succeeded"
    assert estimated_finish(registry, job) is None


def test_bad_training_file_is_refused_with_its_line_and_a_running_job_can_be_cancelled(server):
    c = client(server, "globex")
    bad = server["folder"] / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "oops"}\n')
    with pytest.raises(openai.BadRequestError) as caught:
        c.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert "line 2" in caught.value.body["message"]
    path = write_jsonl(server["folder"] / "long.jsonl", chat_rows(60, seed=4))
    uploaded = c.files.create(file=path.open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=server["base"], training_file=uploaded.id,
                                    hyperparameters={"n_epochs": 200})
    wait_for(c, job.id, ("running",))
    c.fine_tuning.jobs.cancel(job.id)
    assert wait_for(c, job.id, ("cancelled", "succeeded", "failed")).status == "cancelled"


def test_jobs_persist_across_an_api_restart(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_DB_URL", f"sqlite:///{tmp_path / 'r.db'}")
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path / "ws"))
    registry = Registry.open(tmp_path / "ws")
    secret = create_key(registry, "acme")[1]
    settings = Settings(workspace=tmp_path / "ws", bases=[str(tiny_model)], worker=False)
    with running(settings) as url:  # an API with no worker: the job waits in the registry
        c = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        path = write_jsonl(tmp_path / "train.jsonl", chat_rows(12, seed=5))
        file_id = c.files.create(file=path.open("rb"), purpose="fine-tune").id
        job = c.fine_tuning.jobs.create(model=str(tiny_model), training_file=file_id,
                                        hyperparameters={"n_epochs": 1})
    settings.worker = True
    with running(settings) as url:  # restarted, with its worker: the same job runs to the end
        c = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        assert wait_for(c, job.id, ("succeeded", "failed", "cancelled")).status == "succeeded"


def test_rate_limit_per_key_answers_429(server):
    secret = create_key(server["registry"], "acme", rate_per_minute=2)[1]
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=secret, max_retries=0)
    c.models.list()
    c.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        c.models.list()
    assert caught.value.response.headers["retry-after"].isdigit()
    assert client(server).models.list().data  # other keys are not affected


def test_a_keys_rate_limit_holds_across_server_processes_sharing_the_registry(server):
    """Two servers on one registry (as several processes or machines behind a balancer are):
    the key's limit counts the requests of both."""
    secret = create_key(server["registry"], "acme", rate_per_minute=3)[1]
    second = Settings(workspace=server["folder"] / "ws", bases=[server["base"]], worker=False)
    with running(second) as other:
        clients = [openai.OpenAI(base_url=u + "/v1", api_key=secret, max_retries=0)
                   for u in (server["url"], other)]
        for i in range(3):  # alternately: each server alone would allow all of them and more
            clients[i % 2].models.list()
        for c in clients:
            with pytest.raises(openai.RateLimitError) as caught:
                c.models.list()
            assert 0 < int(caught.value.response.headers["retry-after"]) <= 61
    assert client(server).models.list().data  # other keys are not affected


def test_a_job_whose_worker_dies_is_taken_over_and_resumes_from_its_checkpoint(server):
    """The worker is killed after the run's first checkpoint; the server starts a new worker,
    which takes the job over and resumes the run from that checkpoint."""
    import signal

    from tuneloop.store.serving import Job

    c = client(server, "globex")
    path = write_jsonl(server["folder"] / "resume.jsonl", chat_rows(60, seed=6))
    file_id = c.files.create(file=path.open("rb"), purpose="fine-tune").id
    job = c.fine_tuning.jobs.create(model=server["base"], training_file=file_id,
                                    hyperparameters={"n_epochs": 40})
    deadline = time.time() + 300
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data:  # the first checkpoint is written
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status != "succeeded"
        time.sleep(0.2)
    with server["registry"].session() as s:
        worker = s.get(Job, job.id).worker
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)  # the worker dies mid-run
    done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"))  # the server starts another
    assert done.status == "succeeded", done.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any("taken over" in m for m in messages)
    assert any(m.startswith("Resuming run") for m in messages)


def test_a_request_past_its_deadline_is_answered_and_its_rows_freed(tiny_model, tmp_path):
    with two_tenant_server(tiny_model, tmp_path, deployed=False, worker=False,
                           request_timeout_s=0.02) as srv:
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key=srv["keys"]["acme"], max_retries=0)
        with pytest.raises(openai.APIStatusError) as late:
            c.chat.completions.create(model=srv["base"], messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=200, temperature=1, seed=1)
        assert late.value.status_code == 504 and late.value.body["code"] == "timeout"
        for _ in range(100):
            engines = httpx.get(srv["url"] + "/health").json()["engines"]
            if all(e["running"] == 0 for e in engines.values()):
                break
            time.sleep(0.05)
        assert all(e["running"] == 0 for e in engines.values())


def test_a_serving_engine_plugs_in_with_one_registration(tiny_model, tmp_path, monkeypatch):
    """An engine registered in ENGINES serves the bases (`--engine NAME`); merged runs stay
    built-in. Here the new kind wraps the built-in engine and counts what it was asked."""
    from tuneloop.serve import router

    built = []

    def build(base, settings):
        built.append(base)
        return router.ENGINES["builtin"].build(base, settings)

    monkeypatch.setitem(router.ENGINES, "counting",
                        router.EngineKind(build, warm=True))
    monkeypatch.setenv("TUNELOOP_DB_URL", f"sqlite:///{tmp_path / 'registry.db'}")
    settings = Settings(workspace=tmp_path / "ws", bases=[str(tiny_model)], auth=False,
                        worker=False, engine="counting")
    with running(settings) as url:
        assert built == [str(tiny_model)]  # warm: started with the app
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = c.chat.completions.create(model=str(tiny_model), max_tokens=3,
                                          messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None
    assert built == [str(tiny_model)]  # one engine per base, reused
