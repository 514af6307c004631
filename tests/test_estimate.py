"""`tuneloop estimate`: where its throughput comes from, and how processes scale it."""

from __future__ import annotations

import pytest

from tests.test_train_lora import recipe_for
from tuneloop.train.estimate import CPU_PROCESSES_EFFICIENCY, architecture, estimate
from tuneloop.store import Registry


def _finished(registry, model, method, tokens_per_s, **metrics):
    registry.add_run(name="r", task="classify", base_model=model, method=method, status="done",
                     recipe={}, metrics={"train_tokens_per_s": tokens_per_s, "train_s": 60.0,
                                         "device": "cpu", **metrics})


def _rate(recipe, workspace, **kw):
    row = estimate(recipe, methods=["lora"], workspace=workspace, **kw)["methods"][0]
    return row["tokens_per_s"], row["throughput_source"]


def test_measured_throughput_is_taken_from_runs_with_as_many_processes_sharded_alike(
        tiny_model, classify_files, workspace, monkeypatch):
    timed = []  # (a timed measurement), at the model's own layer shapes
    monkeypatch.setattr("tuneloop.train.estimate.matmul_rate",
                        lambda shape: timed.append(shape) or 1e11)
    recipe = recipe_for(tiny_model, *classify_files)
    arithmetic, source = _rate(recipe, workspace)
    assert source.startswith("arithmetic")
    assert timed == [(32, 64)]  # the tiny model's hidden and intermediate sizes
    registry, model = Registry.open(workspace), recipe.base_model
    for rate in (100.0, 120.0, 300.0):  # one process: the median
        _finished(registry, model, "lora", rate)
    _finished(registry, model, "lora", 150.0, processes=2)
    _finished(registry, model, "lora", 90.0, processes=2, sharding="zero3")
    _finished(registry, model, "lora", 80.0, processes=2, fsdp=True)  # before `sharding`
    _finished(registry, model, "full", 999.0, processes=2)
    assert _rate(recipe, workspace) == (120.0, "measured (registry)")
    assert _rate(recipe, workspace, processes=2) == (150.0, "measured (registry)")
    assert _rate(recipe, workspace, processes=2, sharding="zero3")[0] == 90.0
    assert _rate(recipe, workspace, processes=2, sharding="fsdp")[0] == 80.0
    # none measured with four processes: the arithmetic rate, the cores shared
    rate, four_source = _rate(recipe, workspace, processes=4)
    assert four_source == f"{source}, 4 processes sharing the cores"
    assert rate == pytest.approx(arithmetic * CPU_PROCESSES_EFFICIENCY)


def test_each_gpu_adds_its_arithmetic_and_the_time_falls_with_it(tiny_model, classify_files,
                                                                 workspace):
    recipe = recipe_for(tiny_model, *classify_files, method="full")
    one, four = (estimate(recipe, gpu="a100-80gb", methods=["full"], processes=n,
                          workspace=workspace)["methods"][0] for n in (1, 4))
    assert four["tokens_per_s"] == pytest.approx(4 * one["tokens_per_s"])
    assert four["throughput_source"].endswith("x 4 GPUs")
    assert four["seconds"] == pytest.approx(one["seconds"] / 4)
    assert four["cost_usd"] == pytest.approx(one["cost_usd"])  # four GPUs for a quarter


def test_the_largest_micro_batch_holds_at_most_an_updates_examples(tiny_model, classify_files,
                                                                  workspace):
    """Activations are sized for the largest micro-batch: batch_size examples at their
    longest (packed or in rows), never more than the token budget."""
    def activations(**kw):
        recipe = recipe_for(tiny_model, *classify_files, **{"batch_tokens": 100_000, **kw})
        row = estimate(recipe, gpu="h200-141gb", methods=["lora"], workspace=workspace)
        return row["methods"][0]["memory_gb"]["activations"]

    small, large = activations(batch_size=4), activations(batch_size=16)
    assert large == pytest.approx(4 * small)
    capped = activations(batch_size=16, batch_tokens=64)
    assert capped < large and capped == pytest.approx(large * 64 / (16 * _longest(tiny_model, classify_files)))


def _longest(tiny_model, classify_files) -> int:
    from tuneloop.train.estimate import _data_tokens

    return _data_tokens(recipe_for(tiny_model, *classify_files))[1]


def test_a_gpu_micro_batch_is_what_the_memory_model_fits(tiny_model, classify_files, tmp_path,
                                                         workspace):
    import shutil

    from transformers import AutoTokenizer, LlamaConfig

    from tuneloop.train.plan import GPU_MEMORY_SHARE, activation_bytes, fitting_batch_tokens

    per_token = activation_bytes(32, 4096, 14336, 2)  # an 8B Llama's, in bf16
    tokens = fitting_batch_tokens(per_token, 60e9)
    assert tokens % 256 == 0
    assert tokens * per_token <= GPU_MEMORY_SHARE * 60e9 < (tokens + 256) * per_token
    assert fitting_batch_tokens(per_token, 1e6) == 1024  # never below
    assert fitting_batch_tokens(1.0, 1e12) == 65536  # nor above
    # The estimate sizes it as training does: a smaller card, a smaller micro-batch.
    folder = tmp_path / "llama-8b-shape"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    tok = AutoTokenizer.from_pretrained(folder)
    LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8).save_pretrained(folder)
    recipe = recipe_for(folder, *classify_files, batch_tokens=None)
    sizes = {g: estimate(recipe, gpu=g, methods=["lora"], workspace=workspace)["batch_tokens"]
             for g in ("a100-40gb", "h200-141gb")}
    weights = 2 * architecture(str(folder))["parameters"]
    assert sizes == {"a100-40gb": fitting_batch_tokens(per_token, 40 * 2**30 - weights),
                     "h200-141gb": fitting_batch_tokens(per_token, 141 * 2**30 - weights)}
