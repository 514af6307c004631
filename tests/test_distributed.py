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
from tuneloop.train.distributed import launch
from tuneloop.train.run import train


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
        tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    common = dict(max_steps=4, batch_tokens=128, baselines=[], checkpoint_every=1000)
    two = train(recipe_for(tiny_model, train_file, test_file, grad_accum=2, **common),
                workspace=workspace, processes=2)
    one = train(recipe_for(tiny_model, train_file, test_file, grad_accum=4, **common),
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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_process_fsdp_shards_the_model_and_matches_one_process(
        method, tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    common = dict(method=method, max_steps=3, batch_tokens=128, baselines=[],
                  checkpoint_every=1000)
    two = train(recipe_for(tiny_model, train_file, test_file, grad_accum=2, **common),
                workspace=workspace, processes=2, fsdp=True)
    one = train(recipe_for(tiny_model, train_file, test_file, grad_accum=4, **common),
                workspace=workspace)
    assert two["fsdp"] and two["steps"] == one["steps"] == 3
    assert two["ranks_identical"] is None  # each rank held only its shards
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    # each rank held about half of every weight (the tied embedding counts once)
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


def test_fsdp_refuses_what_it_cannot_do_before_starting(tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    for extra, processes, message in (({}, 1, "--processes 2"),
                                      ({"method": "qlora"}, 2, "method qlora")):
        with pytest.raises(TuneloopError, match=message):
            train(recipe_for(tiny_model, train_file, test_file, **extra), workspace=workspace,
                  processes=processes, fsdp=True)


def test_a_sharded_run_resumes_from_its_checkpoint_as_if_never_stopped(
        tiny_model, classify_files, tmp_path):
    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, method="full", max_steps=6,
                        checkpoint_every=3, eval_every=2, patience=50, grad_accum=2,
                        batch_tokens=128, baselines=[])
    whole, cut, plain = (tmp_path / name for name in ("whole", "cut", "plain"))
    for folder in (whole, cut, plain):
        folder.mkdir()
    launch(recipe, whole, 2, fsdp=True)
    # The run as it stood after step 3: its one checkpoint (gathered from both ranks), no model.
    assert [p.name for p in (whole / "checkpoints").glob("step-*")] == ["step-000003"]
    shutil.copytree(whole / "checkpoints", cut / "checkpoints")
    resumed = launch(recipe, cut, 2, resume=True, fsdp=True)
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
    # A sharded checkpoint holds the optimizer by parameter name: a plain run says so.
    shutil.copytree(whole / "checkpoints", plain / "checkpoints")
    with pytest.raises(TuneloopError, match="resume it with --fsdp"):
        launch(recipe, plain, 2, resume=True)


def test_estimate_divides_a_sharded_models_state_by_the_processes(
        tiny_model, classify_files, workspace):
    from tuneloop.estimate import estimate

    train_file, test_file = classify_files
    recipe = recipe_for(tiny_model, train_file, test_file, method="full")
    one, ddp, fsdp = (estimate(recipe, methods=["full"], processes=n, fsdp=sharded,
                               workspace=workspace)["methods"][0]["memory_gb"]
                      for n, sharded in ((1, False), (2, False), (2, True)))
    for part in ("weights", "gradients", "optimizer"):
        assert ddp[part] == one[part] and fsdp[part] == pytest.approx(one[part] / 2)
    assert one["parallel"] == 0 and ddp["parallel"] == pytest.approx(one["gradients"])
    assert 0 < fsdp["parallel"] < one["weights"]  # one layer and the embeddings, gathered
    assert sum(fsdp.values()) < sum(one.values()) < sum(ddp.values())
