"""The classification head (`head: labels`, models/head.py) on the tiny model: its loss is
-log of the gold label's probability as eval decides with it, its probabilities sum to one,
training moves the head and the adapters and nothing else, the artifact carries the head and
scores alike after loading, and a recipe that cannot have a head is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import LABELS, assert_base_unchanged, base_parameters, make_rows
from tuneloop.core.batching import collate, pack
from tuneloop.core.formats import Example
from tuneloop.core.tokenize import prompt_ids
from tuneloop.models import head as label_head
from tuneloop.models.scoring import mean_loss
from tuneloop.tasks import classify
from tuneloop.tasks.labels import LabelTrie, label_distribution


def messages(rows):
    return [classify.prompt(Example(messages=({"role": "user", "content": r["text"]},),
                                    answer=""), None) for r in rows]


def test_the_head_loss_is_minus_log_the_gold_labels_probability(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    head = label_head.attach(model, LABELS)
    with torch.no_grad():
        head.weight.normal_()  # (a fresh head is zero: every label 1/3)
    rows = make_rows(7, seed=3)
    prompts = [prompt_ids(tok, m) for m in messages(rows)]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    golds = [LABELS.index(r["label"]) for r in rows]
    summed, n = label_head.loss(model, collate([label_head.encode(p, g) for p, g in
                                                zip(prompts, golds)], tok.pad_token_id))
    # label_distribution dispatches to the head: eval, validation and the gate decide with it
    probs = label_distribution(model, tok, LabelTrie(tok, LABELS), prompts, batch_size=3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows), dtype=torch.float64))
    expected = -sum(torch.log(probs[i, g]) for i, g in enumerate(golds))
    assert n == len(rows)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-5, atol=1e-5)
    # each row's probabilities are those of the prompt alone (padding changes nothing)
    alone = label_distribution(model, tok, LabelTrie(tok, LABELS), prompts[:1], batch_size=1)
    torch.testing.assert_close(alone[0], probs[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="its own labels"):
        label_distribution(model, tok, LabelTrie(tok, LABELS[:2]), prompts)


def test_a_packed_micro_batch_gives_the_head_the_losses_and_gradients_of_padded_rows(tiny_model):
    """Packed rows (packing: on, the GPU default) serve the head as padded ones: the gold
    label sits at each item's last prompt token either way."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    head = label_head.attach(model, LABELS)
    with torch.no_grad():
        head.weight.normal_()
    rows = make_rows(9, seed=4)
    items = [label_head.encode(prompt_ids(tok, m), LABELS.index(r["label"]))
             for m, r in zip(messages(rows), rows)]

    def loss_and_grads(batch):
        model.zero_grad()
        summed, n = label_head.loss(model, batch)
        summed.backward()
        return summed.detach(), n, [p.grad.clone() for p in model.parameters()]

    padded = loss_and_grads(collate(items, tok.pad_token_id))
    batch = pack(items, tok.pad_token_id, row_tokens=3 * max(len(x) for x in items))
    assert batch["input_ids"].shape[0] < len(items)  # items share rows
    packed = loss_and_grads(batch)
    assert packed[1] == padded[1] == len(items)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(packed[2], padded[2]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_head_trains_with_the_adapter_and_is_kept_in_the_artifact(tiny_model, classify_files,
                                                                    tmp_path):
    from tuneloop.evaluate.runner import score
    from tuneloop.models import load_artifact
    from tuneloop.project import recipe_from_dict
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "classify", "head": "labels",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 10, "learning_rate": 3e-3, "batch_size": 8})
    splits = load_splits(recipe.data, "classify")
    before = base_parameters(tiny_model)
    out = run_lora(recipe, splits, tmp_path / "run")
    model = out["model"]
    assert out["plan"].head == "labels"
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n or "label_head" in n}
    head = label_head.find(model)
    assert head is not None and head.labels == sorted(LABELS)
    assert float(head.weight.detach().abs().sum()) > 0  # it started at zero
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trained.items() if "lora_B" in n)
    assert_base_unchanged(model, before, trained)
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    # ln 3 at the start: a zero head gives every label the same probability; the kept weights
    # fit the training rows well below it (the tiny random model learns them slowly)
    assert abs(curves["train"][0][1] - math.log(3)) < 1e-4
    tok = AutoTokenizer.from_pretrained(tiny_model)
    items = [label_head.encode(prompt_ids(tok, classify.prompt(e, splits.info)),
                               splits.info.labels.index(e.label)) for e in splits.train]
    fitted = mean_loss(model, [collate(items, tok.pad_token_id)], label_head.loss)
    assert fitted < 0.8 * math.log(3)
    assert out["stats"]["val_accuracy_curve"]  # validation accuracy, by the head

    artifact = tmp_path / "run" / "adapter"
    assert json.loads((artifact / "tuneloop.json").read_text())["head"] == "labels"
    torch.testing.assert_close(load_file(str(artifact / label_head.HEAD_FILE))["weight"],
                               head.weight.detach())
    loaded, meta = load_artifact(artifact)
    from tuneloop.tasks import TaskInfo

    info = TaskInfo.from_dict(meta["task"])
    fresh = score(loaded, tok, splits.test, info)
    same = score(model, tok, splits.test, info)
    assert [r["prediction"] for r in fresh["predictions"]] == \
        [r["prediction"] for r in same["predictions"]]
    assert all(r["prediction"] in LABELS for r in fresh["predictions"])
    confidences = [r["confidence"] for r in fresh["predictions"]]
    assert all(1 / 3 <= c <= 1 for c in confidences)


@pytest.mark.parametrize("extra, match", [
    ({"task": "extract"}, "head: labels decides"),
    ({"method": "dpo"}, "head: labels decides"),
    ({"loss": "labels"}, "leave out loss"),
    ({"compile": True}, "leave out compile"),
])
def test_a_recipe_that_cannot_have_a_head_is_refused(extra, match, tmp_path):
    from tuneloop.errors import TuneloopError
    from tuneloop.project import recipe_from_dict

    with pytest.raises((TuneloopError, ValueError), match=match):
        recipe_from_dict({"task": "classify", "head": "labels",
                          "data": {"train": str(tmp_path / "t.jsonl")}, **extra})


def test_the_engine_replies_the_label_its_head_decides_with_the_heads_probability(tiny_model):
    """Served, a head's classifier replies the label eval predicts (the head's argmax) whole,
    with the head's probability; sampled replies are labels too; beside it a request without
    the head in the same batch gets the reply it gets alone."""
    from tuneloop.serve.engine import Engine, Request, Sampling, complete
    from tuneloop.tasks.labels import HeadTrie

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    weight = torch.randn(len(LABELS), model.config.hidden_size)
    prompts = [prompt_ids(tok, m) for m in messages(make_rows(5, seed=7))]
    head = label_head.attach(model, LABELS)  # eval's view of the same head
    with torch.no_grad():
        head.weight.copy_(weight)
    expected = label_distribution(model, tok, LabelTrie(tok, LABELS), prompts)
    del model.label_head  # the engine's base model has no head: the request brings it
    trie = HeadTrie(tok, LABELS, weight)
    engine = Engine(model, tok)
    try:
        plain = complete(engine, prompts[0], Sampling(max_tokens=6, temperature=0))[0]
        for i, prompt in enumerate(prompts):
            choice = complete(engine, prompt, Sampling(max_tokens=32, temperature=0,
                                                       grammar=trie))[0]
            best = int(expected[i].argmax())
            assert choice.text == LABELS[best] and choice.finish_reason == "stop"
            assert choice.confidence == pytest.approx(float(expected[i, best]), rel=1e-4)
        sampled = complete(engine, prompts[0], Sampling(max_tokens=32, temperature=2.0, seed=3,
                                                        grammar=trie), n=6)
        assert all(c.text in LABELS for c in sampled)
        # a plain request and the head's, submitted back to back (usually one batch)
        got = {}
        engine.submit(Request(prompts[0], Sampling(max_tokens=6, temperature=0),
                              lambda kind, *a: got.setdefault("plain", []).append((kind, a))))
        together = complete(engine, prompts[1], Sampling(max_tokens=32, temperature=0,
                                                         grammar=trie))[0]
        assert together.text == LABELS[int(expected[1].argmax())]
        import time

        deadline = time.time() + 30
        while not any(k == "done" for k, _ in got.get("plain", [])) and time.time() < deadline:
            time.sleep(0.05)
        assert "".join(a[1] for k, a in got["plain"] if k == "text") == plain.text
    finally:
        engine.close()


def test_a_deployed_head_classifier_answers_through_the_api_as_eval_predicts(tiny_model,
                                                                            tmp_path):
    """Behind the OpenAI-compatible API (the real server, the real client), a run trained with
    a head answers each message with the label eval predicts for it, with the same confidence,
    streamed alike; the needs_review threshold applies to it as to any classifier."""
    import openai

    from tests.conftest import two_tenant_server
    from tuneloop.models import load_artifact
    from tuneloop.tasks import TaskInfo

    texts = ["i lost my card today", "exchange rate to yen please", "top up failed again"]
    with two_tenant_server(tiny_model, tmp_path, worker=False, recipe={"head": "labels"}) as srv:
        run = srv["runs"]["acme"]
        model, meta = load_artifact(Path(run["artifact"]))
        assert label_head.find(model) is not None
        info = TaskInfo.from_dict(meta["task"])
        tok = AutoTokenizer.from_pretrained(tiny_model)
        prompts = [prompt_ids(tok, m) for m in messages([{"text": t} for t in texts])]
        expected = label_distribution(model, tok, LabelTrie(tok, list(info.labels)), prompts)
        c = openai.OpenAI(base_url=srv["url"] + "/v1", api_key=srv["keys"]["acme"], max_retries=0)
        for i, text in enumerate(texts):
            ask = dict(model="acme-intents", messages=[{"role": "user", "content": text}],
                       max_tokens=1, temperature=0)
            reply = c.chat.completions.create(**ask).choices[0]
            best = int(expected[i].argmax())
            assert reply.message.content == info.labels[best] and reply.finish_reason == "stop"
            assert reply.model_extra["confidence"] == pytest.approx(float(expected[i, best]),
                                                                  rel=1e-4)
            chunks = [ch for ch in c.chat.completions.create(**ask, stream=True) if ch.choices]
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
                info.labels[best]
        review = c.chat.completions.create(**ask, extra_body={"review_below": 1.0})
        assert review.choices[0].message.content == "needs_review"


def test_export_keeps_the_head_beside_the_adapter_and_the_merged_model(tiny_model,
                                                                      classify_files, workspace,
                                                                      tmp_path):
    from safetensors import safe_open

    from tests.test_train_lora import recipe_for
    from tuneloop.train.export import export
    from tuneloop.train.run import train

    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, max_steps=3, baselines=[],
                              head="labels", forgetting={"enabled": False}), workspace=workspace)
    trained = load_file(str(Path(result["artifact"]) / label_head.HEAD_FILE))["weight"]
    export(result["run_id"], tmp_path / "adapter", workspace=workspace)
    export(result["run_id"], tmp_path / "merged", merge=True, workspace=workspace)
    for folder in ("adapter", "merged"):
        torch.testing.assert_close(load_file(str(tmp_path / folder / label_head.HEAD_FILE))
                                   ["weight"], trained)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "label_head" in k]  # plain transformers loads it


def test_the_default_head_is_the_adapter_classifiers_and_what_the_recipe_asks_for_wins(tmp_path):
    from tuneloop.project import recipe_from_dict
    from tuneloop.train.plan import resolve_head

    def head(**extra):
        return resolve_head(recipe_from_dict({"task": "classify", **extra,
                                              "data": {"train": str(tmp_path / "t.jsonl")}}))

    assert head() == "labels" and head(method="qlora") == "labels"
    assert head(method="full") == "none" and head(task="extract") == "none"
    assert head(task="chat", method="dpo") == "none"
    assert head(loss="labels") == head(compile=True) == "none"
    assert head(packing="on") == "labels"  # the head reads packed rows as padded ones
    assert head(head="none") == "none" and head(method="full", head="labels") == "labels"


def test_an_extractor_takes_the_span_head_when_its_values_are_spans_of_the_text(tmp_path):
    from tuneloop.project import recipe_from_dict
    from tuneloop.tasks import extract
    from tuneloop.train.plan import resolve_head

    def head(rows, **extra):
        recipe = recipe_from_dict({"task": "extract", **extra,
                                   "data": {"train": str(tmp_path / "t.jsonl")}})
        return resolve_head(recipe, extract.describe(rows))

    def row(text, to):
        return Example((), "", text=text, fields={"who": "Anna", "to": to})

    copied = [row(f"Anna flew to Rome on day {i}", "Rome") for i in range(10)]
    assert head(copied) == "spans"
    assert head(copied, head="none") == head(copied, method="full") == "none"
    rewritten = copied[:8] + [row("Anna flew home", "Oslo")] * 2  # "to": 80% in the text
    assert extract.describe(rewritten).field_info["to"]["in_text"] == 0.8
    assert head(rewritten) == "none"
