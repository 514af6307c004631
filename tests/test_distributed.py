"""Two-process data-parallel training on CPU (gloo, launched by Accelerate): both ranks end
with identical weights, equal to one process with twice the gradient accumulation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_train_lora import recipe_for
from tuneloop.errors import TuneloopError
from tuneloop.data.splits import load_splits
from tuneloop.train.distributed import launch
from tuneloop.train.full import FULL
from tuneloop.train.run import train
from tuneloop.train.sft import run_sft


def test_two_process_ddp_matches_one_process_with_the_same_batch_size(
        tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    common = dict(max_steps=4, batch_size=8, batch_tokens=128, baselines=[], checkpoint_every=1000)
    two = train(recipe_for(tiny_model, train_file, test_file, **common),
                workspace=workspace, processes=2)
    one = train(recipe_for(tiny_model, train_file, test_file, **common),
                workspace=workspace)
    assert two["processes"] == 2 and two["ranks_identical"]
    assert set(two["rank_digests"]) == {"rank-0", "rank-1"}
    assert two["steps"] == one["steps"] == 4 and two["train_tokens"] == one["train_tokens"]
    a = load_file(f"{two['artifact']}/adapter_model.safetensors")
    b = load_file(f"{one['artifact']}/adapter_model.safetensors")
    for name in b:
        # summation order differs across ranks; AdamW amplifies float rounding in tiny gradients
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    assert abs(two["final_train_loss"] - one["final_train_loss"]) < 1e-6
    assert two["accuracy"] == one["accuracy"]


def test_two_process_dpo_matches_one_process_with_the_same_global_batch(tiny_model, tmp_path,
                                                                       workspace):
    """DPO is an objective of the same loop, so it runs on several processes as SFT does."""
    from tests.conftest import write_jsonl
    from tests.test_dpo import pairs
    from tuneloop.project import recipe_from_dict

    data = {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs(32, 1))),
            "test": str(write_jsonl(tmp_path / "test.jsonl", pairs(8, 2)))}

    def recipe():
        return recipe_from_dict({"base_model": str(tiny_model), "task": "chat", "method": "dpo",
                                 "data": data, "max_steps": 3, "batch_size": 8,
                                 "batch_tokens": 256, "learning_rate": 5e-3, "dpo": {"beta": 0.5},
                                 "checkpoint_every": 1000})

    two = train(recipe(), workspace=workspace, processes=2)
    one = train(recipe(), workspace=workspace)
    assert two["processes"] == 2 and two["ranks_identical"]
    assert two["steps"] == one["steps"] == 3 and two["train_tokens"] == one["train_tokens"]
    a = load_file(f"{two['artifact']}/adapter_model.safetensors")
    b = load_file(f"{one['artifact']}/adapter_model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    assert abs(two["final_train_loss"] - one["final_train_loss"]) < 1e-6
    assert two["test"]["preference_accuracy"] == one["test"]["preference_accuracy"]


def test_two_process_fsdp_training_matches_one_process(tiny_model, classify_files, workspace):
    # (full fine-tuning: the resume test's uninterrupted run is checked against one process)
    sharded_run_matches_one_process("lora", "fsdp", tiny_model, classify_files, workspace)


def sharded_run_matches_one_process(method, sharding, tiny_model, classify_files, workspace):
    """Two sharded processes end where one process with the same global batch does."""
    train_file, test_file = classify_files
    # Validated only at the end: one process keeps a classifier's best weights by validation
    # accuracy, sharded ones by loss (they do not hold the model whole to score it), so with
    # a validation at every step the two could keep different steps' weights.
    common = dict(method=method, max_steps=3, batch_size=8, batch_tokens=128, baselines=[],
                  checkpoint_every=1000, eval_every=1000)
    two = train(recipe_for(tiny_model, train_file, test_file, **common),
                workspace=workspace, processes=2, sharding=sharding)
    one = train(recipe_for(tiny_model, train_file, test_file, **common),
                workspace=workspace)
    assert two["sharding"] == sharding and two["steps"] == one["steps"] == 3
    assert two["ranks_identical"] is None  # each rank held only its shards
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    if sharding == "zero2":  # the weights whole on each rank (their training state sharded)
        assert two["params_held_per_rank"] == total + two["trainable_params"]  # (adapters)
    else:  # each rank held about half of every weight (the tied embedding counts once)
        assert 0.45 * total < two["params_held_per_rank"] < 0.55 * total + 10_000, (
            two["params_held_per_rank"], total)
    assert two["train_tokens"] == one["train_tokens"]
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    a, b = (load_file(f"{r['run_dir']}/{name}") for r in (two, one))
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert abs(two["final_train_loss"] - one["final_train_loss"]) < 1e-5
    assert two["accuracy"] == one["accuracy"]


def test_sharding_refuses_what_it_cannot_do_before_starting(tiny_model, classify_files,
                                                            workspace):
    train_file, test_file = classify_files
    for extra, processes, sharding, message in (
            ({}, 1, "fsdp", "--fsdp shards .* add --processes 2"),
            ({"method": "qlora"}, 2, "fsdp", "method qlora"),
            ({}, 1, "zero3", "--deepspeed zero3 shards .* add --processes 2"),
            ({"method": "dpo"}, 2, "zero2", "method dpo"),
            ({"method": "dora"}, 2, "zero3", "which DoRA reads; use --deepspeed zero2"),
            ({}, 2, "zero1", "unknown sharding")):
        with pytest.raises(TuneloopError, match=message):
            train(recipe_for(tiny_model, train_file, test_file, **extra), workspace=workspace,
                  processes=processes, sharding=sharding)


def test_an_fsdp_run_resumes_from_its_checkpoint_as_if_never_stopped(tiny_model, classify_files,
                                                                     tmp_path):
    sharded_resume_is_exact("fsdp", tiny_model, classify_files, tmp_path)



def sharded_resume_is_exact(sharding, tiny_model, classify_files, tmp_path):
    """A sharded run stopped after its checkpoint and resumed ends as if never stopped, and the
    uninterrupted run where one process with the same global batch does (full fine-tuning);
    returns the uninterrupted run's folder."""
    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, method="full", max_steps=6,
                        checkpoint_every=3, eval_every=2, patience=50, batch_size=8,
                        batch_tokens=128, baselines=[])
    whole, cut, plain = (tmp_path / name for name in ("whole", "cut", "plain"))
    for folder in (whole, cut, plain):
        folder.mkdir()
    launch(recipe, whole, 2, sharding=sharding)
    # The run as it stood after step 3: its one checkpoint (gathered from both ranks), no model.
    assert [p.name for p in (whole / "checkpoints").glob("step-*")] == ["step-000003"]
    shutil.copytree(whole / "checkpoints", cut / "checkpoints")
    resumed = launch(recipe, cut, 2, resume=True, sharding=sharding)
    assert resumed["steps"] == 6
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    curves_a, curves_b = (json.loads((d / "curves.json").read_text()) for d in (whole, cut))
    for kind in ("train", "validation"):
        torch.testing.assert_close(torch.tensor(curves_b[kind]), torch.tensor(curves_a[kind]),
                                   rtol=0, atol=1e-6)
    # A sharded checkpoint's optimizer state is the sharding's own: another run says so
    # (here through the launcher, from inside the ranks; test_zero.py checks the restore alone).
    if sharding == "fsdp":
        shutil.copytree(whole / "checkpoints", plain / "checkpoints")
        with pytest.raises(TuneloopError, match="resume it with --fsdp"):
            launch(recipe, plain, 2, resume=True)
    # one process, the same updates (each rank had half of every update's micro-batches)
    alone = recipe
    run_sft(FULL, alone, load_splits(alone.data, alone.task), tmp_path / "one")
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert one.keys() == a.keys()
    for key in one:
        torch.testing.assert_close(a[key], one[key], rtol=1e-3, atol=1e-5)
    return whole


def test_estimate_divides_a_sharded_models_state_by_the_processes(
        tiny_model, classify_files, workspace):
    from tuneloop.train.estimate import estimate

    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, method="full")
    one, ddp, fsdp, zero2, zero3 = (
        estimate(recipe, methods=["full"], processes=n, sharding=sharding,
                 workspace=workspace)["methods"][0]["memory_gb"]
        for n, sharding in ((1, None), (2, None), (2, "fsdp"), (2, "zero2"), (2, "zero3")))
    for part in ("weights", "gradients", "optimizer"):
        assert ddp[part] == one[part]
        assert fsdp[part] == zero3[part] == pytest.approx(one[part] / 2)
        # ZeRO-2 keeps the weights whole and shards their training state
        assert zero2[part] == (one[part] if part == "weights" else pytest.approx(one[part] / 2))
    assert one["parallel"] == 0 and ddp["parallel"] == pytest.approx(one["gradients"])
    assert 0 < fsdp["parallel"] < one["weights"]  # one layer and the embeddings, gathered
    # DeepSpeed's own float32 copy of this rank's weights and a reduction bucket on top
    assert zero3["parallel"] == pytest.approx(fsdp["parallel"] + one["weights"] / 2
                                              + one["gradients"])
    assert zero2["parallel"] == pytest.approx(one["weights"] / 2 + one["gradients"])
    total = {name: sum(m.values()) for name, m in (("one", one), ("ddp", ddp), ("fsdp", fsdp),
                                                    ("zero2", zero2), ("zero3", zero3))}
    assert total["fsdp"] < total["zero3"] < total["ddp"] and total["zero2"] < total["ddp"]
    assert total["fsdp"] < total["one"] < total["ddp"]
