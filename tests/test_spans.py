"""The span head (`head: spans`, models/spans.py) on the tiny model: decoded tag sequences are
always valid and every value is a substring of its input; tags and texts round-trip; the
bidirectional pass lets a token see the words after it and padding changes nothing; training
moves the head and the adapters and nothing else, keeps the best weights by validation field
F1, and the artifact carries the head and answers alike after loading; a recipe that cannot
have the head is refused."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import assert_base_unchanged, base_parameters, write_jsonl
from tuneloop.core.batching import collate
from tuneloop.models import spans
from tuneloop.tasks import extract

NAMES = ["Anna Smith", "Bob", "Carla Diaz", "Dmitri", "Eve Stone", "Farid Khan"]
CITIES = ["Rome", "Paris", "New York", "Oslo", "Lima"]


def booking_rows(n: int, seed: int) -> list[dict]:
    """Requests naming a guest and a city (in two phrasings), and rows with nothing in them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        if i % 3 == 0:
            out.append({"text": f"please book a table for {name} in {city} tonight",
                        "fields": {"name": name, "city": city}})
        elif i % 3 == 1:
            out.append({"text": f"{name} wants a room near {city}",
                        "fields": {"name": name, "city": city}})
        else:
            out.append({"text": f"is there any news today {i}", "fields": {}})
    return out


@pytest.fixture()
def booking_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", booking_rows(120, 1)),
            write_jsonl(tmp_path / "test.jsonl", booking_rows(24, 2)))


def test_viterbi_paths_are_valid_and_every_value_is_copied_from_the_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    names = ["name", "city"]
    tags, ok = spans.tag_names(names), spans.allowed(names)
    info = {"name": {"type": "string"}, "city": {"type": "list"}}
    gen = torch.Generator().manual_seed(0)
    for row in booking_rows(30, 5):
        ids, offsets = spans.tokens(tok, row["text"])
        logits = torch.randn(len(ids), len(tags), generator=gen) * 4
        # (the most probable tag of each token alone would often be an I- after an O)
        probs = torch.softmax(logits, -1)
        path = spans.viterbi(torch.log(probs), ok)
        assert len(path) == len(ids) and not tags[path[0]].startswith("I-")
        for a, b in zip(path, path[1:]):
            assert ok[a, b], (tags[a], tags[b])
        found, confidence = spans.answer(row["text"], offsets, path, probs, info, names)
        for name in names:
            values = found[name] if isinstance(found[name], list) else [found[name]]
            for v in values:
                assert v is None or v in row["text"]
        assert all(0 < c <= 1 for c in json.loads(json.dumps(
            [x for v in confidence.values() for x in (v if isinstance(v, list) else [v])])))


def test_gold_tags_decode_back_to_the_gold_values(tiny_model):
    """The tags a training row learns are those that give back its values."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    names = ["name", "city"]
    info = {"name": {"type": "string"}, "city": {"type": "string"}}
    for row in booking_rows(12, 7):
        item = spans.encode(tok, row["text"], row["fields"], names, "bidirectional")
        _, offsets = spans.tokens(tok, row["text"])
        probs = torch.nn.functional.one_hot(torch.tensor(item.labels), len(spans.tag_names(names)))
        found, _ = spans.answer(row["text"], offsets, item.labels, probs.float(), info, names)
        assert found == {n: row["fields"].get(n) for n in names}
    echo = spans.encode(tok, "Bob wants a room near Rome", {"name": "Bob"}, names, "echo")
    half = len(echo.input_ids) // 2
    assert echo.input_ids[:half] == echo.input_ids[half:] and set(echo.labels[:half]) == {-100}
    _, found, total = spans.locate("Bob and bob", {"name": ["bob", "Bob", "Eve"]}, names)
    assert (found, total) == (2, 3)  # each value where it first occurs, none taken twice


def test_a_value_is_found_with_spacing_and_punctuation_aside_and_reads_as_one_line(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "NO 290. JALAN AIR PANAS.\nSETAPAK.\n53200 KL\nTOTAL 12.50"
    fields = {"address": "NO 290, JALAN AIR PANAS, SETAPAK", "total": "12.50", "city": "Oslo"}
    names = list(fields)
    spans_, found, total = spans.locate(text, fields, names)
    assert (found, total) == (2, 3)
    assert text[spans_[0][0]:spans_[0][1]] == "NO 290. JALAN AIR PANAS.\nSETAPAK"
    assert spans.locate("a 12.50 b", {"total": "12 50"}, ["total"])[1] == 1  # words, any gap
    assert spans.locate("a 1250 b", {"total": "12 50"}, ["total"])[1] == 0  # not no gap
    item = spans.encode(tok, text, fields, names, "causal")
    _, offsets = spans.tokens(tok, text)
    probs = torch.nn.functional.one_hot(torch.tensor(item.labels), len(spans.tag_names(names)))
    info = {n: {"type": "string"} for n in names}
    got, _ = spans.answer(text, offsets, item.labels, probs.float(), info, names)
    assert got == {"address": "NO 290. JALAN AIR PANAS. SETAPAK", "total": "12.50", "city": None}
    assert extract.normalize(got["address"]) == extract.normalize(fields["address"])


def test_the_bidirectional_pass_sees_later_words_and_padding_changes_nothing(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    a, _ = spans.tokens(tok, "Bob wants a room near Rome")
    b, _ = spans.tokens(tok, "Bob wants a room near Oslo")
    short, _ = spans.tokens(tok, "Bob")
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    for context, sees_ahead in (("bidirectional", True), ("encoder", True), ("causal", False)):
        head = spans.SpanHead(model.config.hidden_size, ["city"], context)
        batch = collate([spans.Encoded(a, a), spans.Encoded(b, b), spans.Encoded(short, short)],
                        tok.pad_token_id)
        with torch.no_grad():
            states = spans._states(model, batch, head)
            alone = spans._states(model, collate([spans.Encoded(short, short)],
                                                 tok.pad_token_id), head)
        moved = not torch.allclose(states[0, :first], states[1, :first], atol=1e-6)
        assert moved == sees_ahead, context
        torch.testing.assert_close(states[2, :len(short)], alone[0], atol=1e-5, rtol=1e-4)


def test_a_span_head_trains_with_the_adapter_and_its_artifact_answers_alike(
        tiny_model, booking_files, tmp_path):
    from tuneloop.data.splits import load_splits
    from tuneloop.evaluate.runner import score
    from tuneloop.models import load_artifact
    from tuneloop.project import recipe_from_dict
    from tuneloop.tasks import TaskInfo
    from tuneloop.train.lora import run_lora

    train_file, test_file = booking_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "extract", "head": "spans",
                               "span_context": "bidirectional",  # (the tiny model learns it fastest)
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 40, "learning_rate": 1e-2, "batch_size": 8})
    splits = load_splits(recipe.data, "extract")
    before = base_parameters(tiny_model)
    out = run_lora(recipe, splits, tmp_path / "run")
    model = out["model"]
    assert out["plan"].head == "spans"
    head = spans.find(model)
    assert head is not None and head.fields == list(splits.info.fields)
    trained = {n for n, _ in model.named_parameters() if "lora_" in n or "span_head" in n}
    assert float(head.weight.detach().abs().sum()) > 0  # it started at zero
    assert_base_unchanged(model, before, trained)
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    # a zero head gives each of the 5 tags the same probability: ln 5 at the start
    assert abs(curves["train"][0][1] - math.log(5)) < 1e-4
    assert curves["validation"][-1][1] < 0.5 * math.log(5)
    stats = out["stats"]
    assert stats["val_metric"] == "field_f1" and stats["val_metric_curve"]
    assert stats["best_val_metric"] == max(f for _, f in stats["val_metric_curve"])
    assert "best_val_accuracy" not in stats

    artifact = tmp_path / "run" / "adapter"
    meta = json.loads((artifact / "tuneloop.json").read_text())
    assert meta["head"] == "spans" and meta["span_context"] == "bidirectional"
    loaded, meta = load_artifact(artifact)
    torch.testing.assert_close(spans.find(loaded).weight, head.weight.detach())
    info = TaskInfo.from_dict(meta["task"])
    fresh, same = score(loaded, AutoTokenizer.from_pretrained(tiny_model), splits.test, info), \
        score(model, AutoTokenizer.from_pretrained(tiny_model), splits.test, info)
    assert [r["output"] for r in fresh["predictions"]] == [r["output"] for r in same["predictions"]]
    m = fresh["metrics"]
    assert m["json_valid_rate"] == 1.0 and m["hallucination_rate"] == 0.0
    # the random 2-layer model's features are poor (a causal read learns nothing here in as
    # many updates), but the zero head it started from found nothing at all (field F1 0)
    assert m["field_f1"] > 0.05 and stats["best_val_metric"] > 0.05, m
    values = 0
    for row in fresh["predictions"]:  # one answer shape: every field, in order
        assert list(row["prediction"]) == list(info.fields)
        assert 0 < row["confidence"] <= 1
        found = {n: v for n, v in row["prediction"].items() if v is not None}
        assert row["value_confidence"].keys() == found.keys()  # one per value found
        for name, p in row["value_confidence"].items():
            assert row["confidence"] <= p <= 1  # a value's tokens are part of the whole path
            values += 1
    assert "calibration" in m and extract.HEADS[0] in extract.HEADS
    value_cal = m["value_calibration"]  # each value's confidence against being right
    assert values and sum(b["n"] for b in value_cal["bins"]) == values


def test_a_hybrid_extractor_finds_its_spans_writes_the_rest_and_answers_in_one_shape(
        tiny_model, tmp_path, workspace):
    """A field whose values are not in the text (a count of nights) is written beside the
    spanned one; the run trains both, its artifact keeps which is which, every answer holds
    every field, in order, and the served reply is eval's."""
    import openai

    from tuneloop.evaluate import evaluate
    from tuneloop.models import load_artifact
    from tuneloop.project import recipe_from_dict
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    rng, days = random.Random(3), ["monday", "tuesday", "wednesday", "thursday", "friday"]
    rows = []
    for _ in range(60):
        a, b = sorted(rng.sample(range(5), 2))
        name = rng.choice(NAMES)
        rows.append({"text": f"{name} stays from {days[a]} to {days[b]}",
                     "fields": {"name": name, "nights": b - a}})
    train_file, test_file = [write_jsonl(tmp_path / f"{k}.jsonl", r)
                             for k, r in (("t", rows[:50]), ("s", rows[50:]))]
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "extract", "head": "spans",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 2, "learning_rate": 1e-2, "batch_size": 8,
                               "baselines": [], "forgetting": {"enabled": False}})
    result = train(recipe, workspace=workspace)
    registry = Registry.open(workspace)
    artifact = Path(registry.get_run(result["run_id"]).adapter_path)
    assert json.loads((artifact / "tuneloop.json").read_text())["written_fields"] == ["nights"]
    loaded, meta = load_artifact(artifact)
    head = spans.find(loaded)
    assert head.fields == ["name"] and head.written == ["nights"] and head.written_tokens > 0
    curves = json.loads((artifact.parent / "curves.json").read_text())
    assert curves["train"][-1][1] < curves["train"][0][1]  # both losses, summed, went down
    ev = evaluate(result["run_id"], test_file, workspace=workspace)
    predictions = [json.loads(line) for line in open(ev["predictions"], encoding="utf-8")]
    for row in predictions:
        assert list(row["prediction"]) == ["name", "nights"]  # one shape, every field
        assert row["prediction"]["name"] is None or row["prediction"]["name"] in NAMES
        assert row["value_confidence"].keys() <= {"name"}  # a written value has none
    assert ev["metrics"]["json_valid_rate"] == 1.0
    deploy(registry, "stays", result["run_id"], "acme", force=True)
    secret = create_key(registry, "acme", bases=[str(tiny_model)])[1]
    with running(Settings(workspace=workspace, bases=[str(tiny_model)])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        for row, predicted in zip(rows[50:53], predictions):
            reply = client.chat.completions.create(
                model="stays", messages=[{"role": "user", "content": row["text"]}], temperature=0)
            assert reply.choices[0].message.content == predicted["output"]
        drawn = client.chat.completions.create(  # the default temperature: drawn, same shape
            model="stays", messages=[{"role": "user", "content": rows[50]["text"]}], seed=1)
        assert list(json.loads(drawn.choices[0].message.content)) == ["name", "nights"]
    # asked for where no field is a span of its text, the head is refused by name
    from tuneloop.data.splits import load_splits
    from tuneloop.errors import TuneloopError
    from tuneloop.train.objective import objective_for

    info = load_splits(recipe.data, "extract").info
    assert extract.spanned(info) == ["name"]
    with pytest.raises(TuneloopError, match="nights 0%.*leave out head"):
        objective_for(recipe, None, extract.subset(info, ["nights"]))


@pytest.mark.parametrize("extra, match", [
    ({"task": "classify", "head": "spans"}, "head: spans finds"),
    ({"method": "dpo", "head": "spans"}, "head: spans finds"),
    ({"head": "spans", "loss": "labels"}, "leave out loss"),
    ({"span_context": "echo"}, "needs head: spans"),
    ({"head": "spans", "span_context": "sideways"}, "bidirectional"),
])
def test_a_recipe_that_cannot_have_a_span_head_is_refused(extra, match):
    from tuneloop.errors import TuneloopError
    from tuneloop.project import recipe_from_dict

    with pytest.raises(TuneloopError, match=match):
        recipe_from_dict({"task": "extract", "data": {"train": "t.jsonl"}, **extra})


def test_a_served_span_head_answers_as_eval_predicts(tiny_model, booking_files, workspace,
                                                     tmp_path):
    """`tuneloop train` with head: spans, `evaluate`, then the deployment behind the real
    openai client: each reply is eval's prediction for the same row, in the one JSON shape,
    a JSON schema it does not match is refused by name, and the legacy route is refused."""
    import openai

    from tuneloop.evaluate import evaluate
    from tuneloop.project import recipe_from_dict
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    train_file, test_file = booking_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "extract", "head": "spans",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 4, "learning_rate": 1e-2, "baselines": [],
                               "forgetting": {"enabled": False}})
    result = train(recipe, workspace=workspace)
    assert result["test"]["hallucination_rate"] == 0.0
    ev = evaluate(result["run_id"], test_file, workspace=workspace)
    predictions = [json.loads(line) for line in open(ev["predictions"], encoding="utf-8")]
    # exported merged, the head travels in its own file and answers alike
    from tuneloop.evaluate.runner import score
    from tuneloop.models import load_artifact
    from tuneloop.tasks import TaskInfo
    from tuneloop.train.export import export
    from tuneloop.data.splits import load_splits

    export(result["run_id"], tmp_path / "merged", merge=True, workspace=workspace)
    merged, meta = load_artifact(tmp_path / "merged")
    assert spans.find(merged) is not None and (tmp_path / "merged" / spans.SPAN_FILE).is_file()
    again = score(merged, AutoTokenizer.from_pretrained(tiny_model),
                  load_splits(recipe.data, "extract").test, TaskInfo.from_dict(meta["task"]))
    assert [r["output"] for r in again["predictions"]] == [p["output"] for p in predictions]
    registry = Registry.open(workspace)
    from tuneloop.evaluate.run_report import render_html, report_data

    data = report_data(result["run_id"], registry, workspace)  # rows and values, apart
    page = render_html(data)
    assert data["value_calibration"] == result["test"]["value_calibration"]
    assert {f: v["path"] for f, v in data["per_field"].items()} == {"name": "span", "city": "span"}
    assert "whole tag path" in page and "span's probability" in page and "needs_review" not in page
    deploy(registry, "bookings", result["run_id"], "acme", force=True)
    secret = create_key(registry, "acme", bases=[str(tiny_model)])[1]
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    with running(Settings(workspace=workspace, bases=[str(tiny_model)])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        for row, predicted in zip(rows[:4], predictions):
            reply = client.chat.completions.create(
                model="bookings", messages=[{"role": "user", "content": row["text"]}],
                temperature=0)
            content = reply.choices[0].message.content
            assert content == predicted["output"] and list(json.loads(content)) == ["name", "city"]
            assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(
                                   model="bookings", stream=True, temperature=0,
                                   messages=[{"role": "user", "content": row["text"]}]))
            assert streamed == content
        sampled = client.chat.completions.create(  # the OpenAI default, temperature 1: drawn
            model="bookings", messages=[{"role": "user", "content": rows[0]["text"]}], n=3,
            seed=7)
        for choice in sampled.choices:
            for value in json.loads(choice.message.content).values():
                assert value is None or value in rows[0]["text"]
        other = {"type": "object", "properties": {"guest": {"type": "string"}},
                 "required": ["guest"], "additionalProperties": False}
        with pytest.raises(openai.BadRequestError, match="span head"):
            client.chat.completions.create(
                model="bookings", messages=[{"role": "user", "content": rows[0]["text"]}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": other}})
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.chat.completions.create(
                model="bookings", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
        with pytest.raises(openai.BadRequestError, match="chat/completions"):
            client.completions.create(model="bookings", prompt="Bob in Rome")
