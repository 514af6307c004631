"""models compare: every candidate scored in its own process, refusals by licence, the recommendation."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from tuneloop.train.compare import compare, recommend
from tuneloop.project import recipe_from_dict


@pytest.fixture()
def deeper_model(tiny_model, tmp_path):
    """The tiny model's tokenizer with a 4-layer network: more parameters, same task."""
    folder = tmp_path / "deeper"
    shutil.copytree(tiny_model, folder)
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = 4
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_recommendation_is_the_smallest_model_within_tolerance():
    rows = [{"model": "big", "parameters": 300, "quality": 0.80},
            {"model": "small", "parameters": 100, "quality": 0.79},
            {"model": "tiny", "parameters": 10, "quality": 0.60}]
    assert recommend(rows, "quality", 0.02)["model"] == "small"
    assert recommend(rows, "quality", 0.0)["model"] == "big"
    assert recommend(rows, "quality", 0.5)["model"] == "tiny"
    assert recommend([], "quality", 0.1) is None


def test_compare_scores_each_candidate_and_refuses_restricted_licences(
        tiny_model, deeper_model, classify_files, workspace):
    train, test = classify_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "classify",
                               "data": {"train": str(train), "test": str(test)},
                               "baselines": ["zero-shot", "few-shot"], "many_shot_tokens": 200})
    result = compare(recipe, [str(tiny_model), str(deeper_model), "gemma3-270m"], tolerance=1.0,
                     sample=4, workspace=workspace)
    tiny, deeper, gemma = result["rows"]
    assert "Gemma Terms of Use" in gemma["refused"] and "accept_licences" in gemma["refused"]
    assert deeper["parameters"] > tiny["parameters"]
    for row in (tiny, deeper):
        assert row["strategy"] in {"zero-shot", "few-shot"}
        assert row["quality"] == max(row["baselines"].values())
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["peak_rss_mb"] > 0 and row["tokens_per_s"] > 0
    assert result["recommendation"]["model"] == str(tiny_model)  # everything is within 1.0
    assert (workspace / "comparisons").is_dir() and result["path"].endswith(".json")
