"""The serving engine on a tiny model: continuous batching gives each request exactly what it
would get alone; rows of different adapters share a forward pass and still get their own
adapter; stop strings, lengths, seeds and JSON grammars behave as OpenAI's parameters say."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.serve.adapters import BASE
from tuneloop.serve.engine import Engine, Sampling, complete

PROMPTS = ["i lost my card", "what is the rate for yen please tell me now", "top up", "help me fast again today"]


def ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def alone(model, tok, prompt, n):
    """Reference: transformers' greedy generate on the prompt alone, cut at end-of-turn."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):]
    tokens = out.tolist()
    if tok.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
    return tok.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return model, tok


def make_adapter(tiny_model, folder, seed, rank=4):
    """A LoRA adapter with random (non-zero) B so that it changes the model's output."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(folder)
    return folder


def test_continuous_batching_matches_each_request_alone(tiny):
    model, tok = tiny
    engine = Engine(AutoModelForCausalLM.from_pretrained(model.name_or_path).eval(), tok, max_batch=3)
    prompts = [ids(tok, p) for p in PROMPTS * 2]
    results: dict[int, list] = {}

    def ask(i):
        results[i] = complete(engine, prompts[i], Sampling(max_tokens=12 + i, temperature=0))

    threads = []
    for i in range(len(prompts)):  # staggered arrivals join a batch that is already decoding
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        time.sleep(0.01 * (i % 3))
    for t in threads:
        t.join()
    engine.close()
    for i, prompt in enumerate(prompts):
        choice = results[i][0]
        assert choice.text == alone(model, tok, prompt, 12 + i)
        assert choice.finish_reason in ("stop", "length")
        assert choice.tokens <= 12 + i


def test_mixed_adapter_batch_gives_every_row_its_own_adapter(tiny, tiny_model, tmp_path):
    _, tok = tiny
    paths = {name: make_adapter(tiny_model, tmp_path / name, seed, rank) for name, seed, rank in (("alpha", 1, 4), ("beta", 2, 8))}
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tok, max_batch=8)
    jobs = [(p, name) for p in PROMPTS for name in (BASE, "alpha", "beta")]
    results = {}

    def ask(i, prompt, name):
        results[i] = complete(engine, ids(tok, prompt), Sampling(max_tokens=10, temperature=0),
                              adapter=name, adapter_path=paths.get(name))[0].text

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    expected = {BASE: base}
    for name in ("alpha", "beta"):
        expected[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), paths[name]).eval()
    for i, (prompt, name) in enumerate(jobs):
        assert results[i] == alone(expected[name], tok, ids(tok, prompt), 10), (prompt, name)
    assert len({results[i] for i, (p, _) in enumerate(jobs) if p == PROMPTS[0]}) > 1  # adapters differ


def test_adapters_are_evicted_least_recently_used_under_the_budget(tiny, tiny_model, tmp_path):
    _, tok = tiny
    names = ["alpha", "beta", "gamma"]
    paths = {n: make_adapter(tiny_model, tmp_path / n, i) for i, n in enumerate(names)}
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tok, adapter_budget_bytes=1)
    greedy = Sampling(max_tokens=6, temperature=0)
    first = complete(engine, ids(tok, "help"), greedy, "alpha", paths["alpha"])[0].text
    for name in names[1:]:
        complete(engine, ids(tok, "help"), greedy, name, paths[name])
    assert list(engine.pool.resident) == ["gamma"] and engine.pool.evictions == 2
    again = complete(engine, ids(tok, "help"), greedy, "alpha", paths["alpha"])[0].text
    assert again == first and engine.pool.loads == 4  # reloaded on demand, same weights
    engine.close()


def test_stop_strings_lengths_seeds_and_n(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    prompt = ids(tok, PROMPTS[1])
    full = complete(engine, prompt, Sampling(max_tokens=20, temperature=0))[0]
    assert full.finish_reason == "length" and full.tokens == 20
    stop = full.text[4:6]
    cut = complete(engine, prompt, Sampling(max_tokens=20, temperature=0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    sampled = [complete(engine, prompt, Sampling(max_tokens=15, temperature=1.5, seed=7), n=3)
               for _ in range(2)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]  # a seed replays exactly
    assert len({c.text for c in sampled[0]}) > 1  # the n choices are different samples
    engine.close()


def test_json_schema_grammar_always_parses_and_validates(tiny):
    import jsonschema

    model, tok = tiny
    engine = Engine(model, tok)
    schema = {"type": "object", "properties": {"label": {"enum": ["card_lost", "top_up"]},
                                               "urgent": {"type": "boolean"}},
              "required": ["label", "urgent"], "additionalProperties": False}
    grammar = engine.compile_grammar(json.dumps(schema))
    choices = complete(engine, ids(tok, PROMPTS[0]), Sampling(max_tokens=40, temperature=1.0, seed=3,
                                                              grammar=grammar), n=4)
    for c in choices:  # a random tiny model, yet every reply is valid JSON of the schema
        jsonschema.validate(json.loads(c.text), schema)
        assert c.finish_reason == "stop"
    engine.close()


def test_distinct_client_schemas_do_not_grow_the_grammar_cache_without_bound(tiny, monkeypatch):
    """Each request may bring its own schema; the compiled grammars kept stay under the cache's
    bound in bytes (here shrunk so that a few schemas fill it), and a schema pushed out compiles
    again. Asked for as the API asks: nothing but that cache keeps a grammar (a cache bounded
    by count above it held 256 of any size, out of reach of the bound in bytes)."""
    import gc
    import weakref

    from tuneloop.serve.api import _grammar
    from tuneloop.serve.router import Target
    from tuneloop.serve.schemas import ResponseFormat
    from tuneloop.tasks import extract

    model, tok = tiny
    monkeypatch.setattr(extract, "GRAMMAR_CACHE_BYTES", 256 * 1024)
    engine = Engine(model, tok)
    sizes, kept = [], []
    for i in range(40):
        schema = {"type": "object", "properties": {f"f{i}": {"enum": [f"v{i}-{j}" for j in range(50)]}},
                  "required": [f"f{i}"]}
        asked = ResponseFormat.model_validate({"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": schema}})
        kept.append(weakref.ref(_grammar(Target("base", engine), asked)))
        sizes.append(engine.grammars().bytes)
    gc.collect()
    cache = engine.grammars()
    assert max(sizes) <= 256 * 1024 and sizes[5] > 0 and 0 < len(cache.entries) < 40
    alive = [ref() for ref in kept if ref() is not None]  # only the cache holds any
    assert len(alive) == len(cache.entries)
    assert all(any(g is c for c in cache.entries.values()) for g in alive)
    assert engine.compile_grammar(json.dumps({"type": "object"})) is not None
    engine.close()


def test_the_grammar_cache_keeps_the_most_recent_within_its_bytes(tiny):
    from tuneloop.tasks import extract

    _, tok = tiny
    compiler = extract.grammar_compiler(tok, len(tok))
    enum = lambda n, tag: json.dumps({"enum": [f"{tag}-{i}" for i in range(n)]})  # noqa: E731
    one = extract.compile_schema(compiler, enum(20, "a")).memory_size_bytes
    cache = extract.GrammarCache(compiler, limit_bytes=int(2.5 * one))
    first = cache.get(enum(20, "a"))
    assert cache.get(enum(20, "a")) is first  # a hit is the same grammar
    cache.get(enum(20, "b"))
    cache.get(enum(20, "a"))  # (a is now the most recent)
    cache.get(enum(20, "c"))  # over the bound: the least recent, b, goes
    assert list(cache.entries) == [enum(20, "a"), enum(20, "c")] and cache.bytes <= cache.limit
    big = cache.get(enum(400, "d"))  # larger than the bound: compiled, answered, not kept
    assert big is not None and enum(400, "d") not in cache.entries and len(cache.entries) == 2


def test_an_extraction_adapter_is_held_to_its_fields_without_a_response_format(tiny):
    from tuneloop.serve.api import _grammar
    from tuneloop.serve.router import Target
    from tuneloop.tasks import TaskInfo

    model, tok = tiny
    engine = Engine(model, tok)
    target = Target("receipts", engine, task=TaskInfo("extract", fields=("total", "date")))
    grammar = _grammar(target, None)
    assert _grammar(Target("base", engine), None) is None  # a plain model is not constrained
    replies = complete(engine, ids(tok, "total 12 on monday"),
                       Sampling(max_tokens=200, temperature=0.8, seed=1, grammar=grammar), n=3)
    for reply in replies:
        if reply.finish_reason == "stop":  # a random model may run out of tokens in a string
            assert set(json.loads(reply.text)) == {"total", "date"}
    assert any(r.finish_reason == "stop" for r in replies)
    engine.close()


def test_a_request_that_fails_gets_an_error_and_the_engine_serves_on(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    with pytest.raises(RuntimeError, match="generation failed"):
        complete(engine, [10**6], Sampling(max_tokens=3, temperature=0))  # no such token id
    assert complete(engine, ids(tok, "help"), Sampling(max_tokens=3, temperature=0))[0].tokens > 0
    engine.close()


def test_a_request_that_fails_alone_leaves_the_batch_it_joined_untouched(tiny):
    """Requests that fail while being set up (a broken grammar) or while being stepped (a stop
    that is not text) are answered with an error; another request running in the same batch
    gets exactly the reply it gets alone, and a seed at the top of int64 is served."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8)
    healthy = ids(tok, PROMPTS[1])
    reference = alone(model, tok, healthy, 40)
    results: dict[str, object] = {}

    def ask(name, prompt, sampling):
        try:
            results[name] = complete(engine, prompt, sampling, timeout=60)[0].text
        except RuntimeError as exc:
            results[name] = exc

    other = threading.Thread(target=ask, args=("healthy", healthy, Sampling(max_tokens=40, temperature=0)))
    other.start()
    while not engine.rows:  # the healthy request is running
        time.sleep(0.001)
    for name, sampling in (("setup", Sampling(max_tokens=5, grammar="not a grammar")),
                           ("step", Sampling(max_tokens=5, stop=(None,))),
                           ("top_seed", Sampling(max_tokens=5, seed=2**63 - 1, temperature=1.0))):
        ask(name, ids(tok, "help"), sampling)
    other.join(timeout=60)
    assert isinstance(results["setup"], RuntimeError) and isinstance(results["step"], RuntimeError)
    assert isinstance(results["top_seed"], str)
    assert results["healthy"] == reference
    engine.close()


def test_the_engine_gives_a_bursts_memory_back_once_it_is_idle(tiny, monkeypatch):
    """After a batch ends and nothing waits, the allocator's free memory is returned (once per
    burst, never while rows are decoding)."""
    from tuneloop.serve import engine as engine_module

    model, tok = tiny
    calls = []
    monkeypatch.setattr(engine_module, "_release_memory",
                        lambda: calls.append(None if not engine.rows else "busy"))
    engine = Engine(model, tok)
    try:
        time.sleep(0.7)
        assert calls == []  # idle from the start: nothing to give back
        for _ in range(2):  # a burst of two requests at once, then idle
            threads = [threading.Thread(target=complete, args=(
                engine, ids(tok, p), Sampling(max_tokens=6, temperature=0))) for p in PROMPTS[:2]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.7)
        assert calls == [None, None]  # once after each burst, with no rows in flight
    finally:
        engine.close()
