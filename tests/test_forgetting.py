"""The forgetting check on the tiny model: an unchanged adapter is not flagged, a damaging one
is, the base's score is cached, and every run reports it."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.evaluate import forgetting
from tuneloop.project import ForgettingSpec


def test_answers_are_marked_by_number_or_by_text():
    assert forgetting.right({"answer": "42"}, "42")
    assert forgetting.right({"answer": "42"}, "The answer is 42.")
    assert not forgetting.right({"answer": "42"}, "41, or maybe 42")  # the first number counts
    assert forgetting.right({"answer": "Paris"}, "paris, of course")
    assert not forgetting.right({"answer": "Paris"}, "London")


def test_the_suite_ships_with_its_attribution():
    items = forgetting.suite()
    assert len(items) == 50 and {i["kind"] for i in items} == {
        "arithmetic", "knowledge", "instructions", "gsm8k"}
    readme = (forgetting.SUITE.parent / "README.md").read_text()
    assert "MIT" in readme and "grade-school-math" in readme


def test_a_damaging_adapter_is_flagged_and_an_idle_one_is_not(tiny_model, workspace):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    spec = ForgettingSpec()
    idle = forgetting.check(model, tokenizer, "tiny", workspace, spec)
    assert idle["accuracy_drop"] == 0 and abs(idle["loss_increase"]) < 1e-6
    assert not idle["flagged"] and idle["reasons"] == []
    cache = json.loads((workspace / "cache" / f"general-{forgetting.suite_hash()}.json").read_text())
    assert cache["tiny"]["loss"] == idle["base"]["loss"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 5.0)  # confident, wrong logits everywhere
    damaged = forgetting.check(model, tokenizer, "tiny", workspace, spec)
    assert damaged["base"] == idle["base"]  # from the cache
    assert damaged["loss_increase"] > 0.2 and damaged["flagged"]
    assert any("loss on reference solutions rose" in r for r in damaged["reasons"])


def test_every_run_reports_the_check(tiny_model, classify_files, workspace):
    from tests.test_train_lora import recipe_for
    from tuneloop.train.run import train

    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, max_steps=2, baselines=[]),
                   workspace=workspace)
    check = result["forgetting"]
    assert check["items"] == 50 and set(check["base"]) == {"accuracy", "by_kind", "loss"}
    assert isinstance(check["flagged"], bool) and len(check["answers"]) == 30
    off = train(recipe_for(tiny_model, train_file, test_file, max_steps=1, baselines=[],
                           forgetting={"enabled": False}), workspace=workspace)
    assert "forgetting" not in off
