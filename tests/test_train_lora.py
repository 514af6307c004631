"""LoRA training on the tiny model: the right parameters move, artifacts are written and reload."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import write_jsonl
from tuneloop.project import recipe_from_dict
from tuneloop.store import Registry
from tuneloop.train.run import train


def recipe_for(tiny_model, train_file, test_file, **extra):
    return recipe_from_dict({"base_model": str(tiny_model), "task": "classify",
                             "data": {"train": str(train_file), "test": str(test_file)},
                             "method": "lora", "epochs": 2, "learning_rate": 5e-3,
                             "batch_size": 8, "batch_tokens": 256, **extra})


def test_lora_trains_adapters_only_and_writes_a_loadable_adapter(tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    # (head: none: the tiny model's head never beats its first validation, so the adapters
    # kept would be those of step 1, still zero; tests/test_head.py trains the head longer)
    result = train(recipe_for(tiny_model, train_file, test_file, head="none"), workspace=workspace)

    run_dir = workspace / "runs" / result["run_id"]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "adapter/tuneloop.json", "recipe.yaml", "loss.png", "metrics.json",
                 "test/predictions.jsonl"):
        assert (run_dir / name).is_file(), name
    assert result["train_tokens"] > 0 and result["train_tokens_per_s"] > 0
    assert 0.0 <= result["accuracy"] <= 1.0 and result["test"]["n"] == 12

    # Every LoRA B matrix moved away from its zero init; loss went down.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    curves = json.loads((run_dir / "curves.json").read_text())
    assert curves["train"][-1][1] < curves["train"][0][1]

    # The base weights on disk and in a fresh load are untouched; the adapter reloads exactly.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, base_state[k], rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(fresh, run_dir / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                          run_dir / "adapter").eval()(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)
    torch.testing.assert_close(tuned, again, rtol=0, atol=0)

    run = Registry.open(workspace).get_run(result["run_id"])
    assert run.status == "done" and run.metrics["accuracy"] == result["accuracy"]


def test_frozen_parameters_stay_frozen_during_training(tiny_model, classify_files, tmp_path):
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    # (head: none, as above; the head's trained and frozen weights: tests/test_head.py)
    recipe = recipe_for(tiny_model, train_file, test_file, max_steps=3, head="none")
    out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    model = out["model"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    changed, frozen = 0, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name
            changed += int("lora_B" in name and p.abs().sum() > 0)
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p.detach().cpu(), base[key].to(p.dtype), rtol=0, atol=0)
            frozen += 1
    assert changed > 0 and frozen > 0
    assert out["stats"]["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())  # checkpoints written


def test_same_seed_same_run(tiny_model, classify_files, tmp_path):
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, max_steps=4)
    splits = load_splits(recipe.data, "classify")
    run_lora(recipe, splits, tmp_path / "a")
    run_lora(recipe, splits, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "curves.json").read_text())
    b = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert a == b


def test_extract_and_chat_tasks_train_and_score(tiny_model, tmp_path, workspace):
    from tests.conftest import write_jsonl

    rows = [{"text": f"invoice from acme {i} total {i}.50", "fields": {"company": "acme", "total": f"{i}.50"}}
            for i in range(24)]
    chats = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
             for w in ["today", "now", "again", "euro", "dollar", "pound"] * 4]
    for task, data, keys in (("extract", rows, ("field_f1", "json_valid_rate")),
                             ("chat", chats, ("rouge_l", "perplexity"))):
        train_file = write_jsonl(tmp_path / f"{task}.jsonl", data[:20])
        test_file = write_jsonl(tmp_path / f"{task}-test.jsonl", data[20:])
        recipe = recipe_from_dict({"base_model": str(tiny_model), "task": task, "max_steps": 2,
                                   "data": {"train": str(train_file), "test": str(test_file)}})
        result = train(recipe, workspace=workspace)
        for key in keys:
            assert key in result, (task, key)
        assert result["test"]["n"] == 4


def test_early_stopping_keeps_the_best_weights(tiny_model, classify_files, tmp_path):
    from safetensors.torch import load_file

    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    # A learning rate far too high: validation loss soon rises, and training must stop.
    recipe = recipe_for(tiny_model, train_file, test_file, max_steps=40, epochs=20, head="none",
                        learning_rate=0.5, eval_every=1, patience=2, checkpoint_every=1000)
    out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    stats = out["stats"]
    assert stats["stopped_early"] and stats["steps"] < 40
    val = dict(json.loads((tmp_path / "run" / "curves.json").read_text())["validation"])
    # (a classifier's best is its best validation accuracy; the loss is the tie-break)
    top = max(a for _, a in stats["val_accuracy_curve"])
    assert stats["best_val_accuracy"] == top and val[stats["best_step"]] == stats["best_val_loss"]
    assert stats["steps"] - stats["best_step"] == 2  # two validations without improvement
    best = load_file(tmp_path / "run" / "checkpoints" / "best.safetensors")
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {k.replace(".default", "") for k in best} == set(saved)
    for name, tensor in best.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], tensor, rtol=0, atol=0)


def test_curves_are_read_as_over_or_underfitting():
    from tuneloop.train.sft import diagnose

    train = [(s, 2.0 - s * 0.1) for s in range(1, 11)]
    assert diagnose({"train": train, "validation": [(2, 1.0), (4, 0.8), (6, 0.9), (8, 1.1)]}) == "overfitting"
    assert diagnose({"train": train, "validation": [(2, 1.0), (4, 0.8), (6, 0.6)]}) == "underfitting"
    assert diagnose({"train": train, "validation": [(2, 1.0), (4, 0.8), (6, 0.795)]}) == "good"
    assert diagnose({"train": train, "validation": [(2, 1.0)]}) is None


def test_the_weights_kept_are_the_best_by_validation_accuracy(tiny_model, classify_files, tmp_path):
    """A classifier keeps the weights of its best validation accuracy (ties: the lower loss),
    not its last ones, without being asked to stop early."""
    from safetensors.torch import load_file

    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    # A learning rate far too high: accuracy rises, then training wrecks it.
    recipe = recipe_for(tiny_model, train_file, test_file, max_steps=16, epochs=20, head="none",
                        learning_rate=0.3, eval_every=1, checkpoint_every=1000)
    out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    stats = out["stats"]
    assert not stats["stopped_early"] and stats["steps"] == 16
    accuracy = dict(stats["val_accuracy_curve"])
    loss = dict(json.loads((tmp_path / "run" / "curves.json").read_text())["validation"])
    assert len(accuracy) == 16
    top = max(accuracy.values())
    expected = min((s for s, a in accuracy.items() if a == top), key=lambda s: loss[s])
    assert stats["best_step"] == expected and stats["best_val_accuracy"] == top
    assert stats["best_step"] != 16, accuracy  # the case under test: the last was not the best
    best = load_file(tmp_path / "run" / "checkpoints" / "best.safetensors")
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    for name, tensor in best.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], tensor, rtol=0, atol=0)


def test_extraction_with_empty_rows_and_list_fields_trains_and_is_scored(tiny_model, tmp_path, workspace):
    """Rows with nothing to extract train as the all-null answer and are scored for answering
    nothing; list fields are learned and scored as lists."""
    from tuneloop.core.tokenize import encode
    from tuneloop.data.splits import load_splits

    words = ["ann", "bob", "cy", "dan"]
    rows = []
    for i in range(40):
        if i % 3 == 0:
            rows.append({"text": f"nothing here {i}", "fields": {}})
        else:
            who = [words[i % 4], words[(i + 1) % 4]][: 1 + i % 2]
            rows.append({"text": f"{' and '.join(who)} came {i}", "fields": {"people": who}})
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    test_file = write_jsonl(tmp_path / "test.jsonl", rows[32:])
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "extract", "baselines": [],
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "max_steps": 3, "forgetting": {"enabled": False},
                               "head": "none"})  # (the written path: its values are spans)
    splits = load_splits(recipe.data, "extract")
    assert splits.info.fields == ("people",) and splits.info.field_info["people"]["type"] == "list"
    empty = next(e for e in splits.train if e.fields == {})
    from tuneloop.tasks import extract

    assert extract.target(empty, splits.info) == '{"people": null}'
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode(tok, extract.prompt(empty, splits.info), extract.target(empty, splits.info))
    learned = tok.decode([t for t in enc.labels if t >= 0], skip_special_tokens=True)
    assert learned == '{"people": null}'
    result = train(recipe, workspace=workspace)
    test = result["test"]
    assert test["json_valid_rate"] == 1.0 and test["empty_rows"] == 3
    assert 0.0 <= test["empty_row_accuracy"] <= 1.0 and "hallucination_rate" in test


def test_validation_passes_are_no_larger_than_a_training_micro_batch(
        tiny_model, classify_files, tmp_path, monkeypatch):
    """A GPU's token budget fits the device, but an update holds batch_size examples: passes
    without gradients (validation, DPO's reference) at the whole budget would set the run's
    memory peak. They are cut to training's largest micro-batch."""
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora
    from tuneloop.train.objective import Objective

    made = []
    real = Objective.batches

    def recording(self, items, pad, batch_tokens):
        out = real(self, items, pad, batch_tokens)
        made.extend(out)
        return out

    monkeypatch.setattr(Objective, "batches", recording)
    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, head="none", batch_size=2,
                        batch_tokens=4096, max_steps=2)
    out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    plan = out["plan"]
    assert plan.batch_tokens == 4096 and plan.batch_size == 2
    assert len(made) > 1  # the budget alone would take every validation example at once
    assert all(b["input_ids"].numel() <= 2 * plan.max_length for b in made)
