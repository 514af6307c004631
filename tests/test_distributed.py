"""Two-process data-parallel training on CPU (gloo, launched by Accelerate): both ranks end
with identical weights, equal to one process with twice the gradient accumulation."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.test_train_lora import recipe_for
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
