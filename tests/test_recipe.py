"""Recipes: the minimal form works, errors name the key and the fix, every shipped recipe parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.errors import TuneloopError
from tuneloop.project import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"base_model": "smollm2-135m-instruct", "task": "classify",
           "data": {"train": "t.jsonl", "test": "e.jsonl"}, "method": "lora"}


def test_minimal_recipe_has_everything_else_derived():
    r = recipe_from_dict(MINIMAL)
    assert r.learning_rate is None and r.epochs is None and r.max_length is None
    assert r.lora.rank == 16 and r.seed == 0


def test_relative_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(
        "task: classify\ndata: {train: data/t.jsonl, test: /abs/e.jsonl}\n")
    r = load_recipe(tmp_path / "sub" / "r.yaml")
    assert r.data.train == tmp_path / "sub" / "data" / "t.jsonl"
    assert r.data.test == Path("/abs/e.jsonl")


@pytest.mark.parametrize("change, message", [
    ({"lerning_rate": 1e-4}, "lerning_rate: unknown key; did you mean 'learning_rate'?"),
    ({"task": "summarize"}, "task: Input should be 'classify', 'extract' or 'chat'"),
    ({"learning_rate": -1}, "learning_rate: Input should be greater than 0"),
    ({"data": {"train": "t.jsonl", "tset": "x"}}, "data.tset: unknown key; did you mean 'test'?"),
    ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than 0"),
    ({"grad_accum": 4}, "grad_accum is gone: an optimizer update is batch_size examples"),
    ({"fields": [{"name": "total", "type": "money"}]}, "fields.0.type: Input should be"),
])
def test_errors_name_the_key_and_the_fix(change, message):
    with pytest.raises(TuneloopError) as err:
        recipe_from_dict({**MINIMAL, **change})
    assert message in str(err.value)


def test_a_run_recorded_with_the_old_default_grad_accum_still_resumes():
    assert recipe_from_dict({**MINIMAL, "grad_accum": 1}).batch_size is None


def test_missing_required_key():
    with pytest.raises(TuneloopError, match="task: required"):
        recipe_from_dict({"data": {"train": "x"}})


def test_bad_yaml_names_the_line(tmp_path):
    (tmp_path / "r.yaml").write_text("task: classify\ndata: {train: [unclosed\n")
    with pytest.raises(TuneloopError, match=r"r.yaml line \d+: not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(TuneloopError, match="a recipe is a YAML mapping"):
        load_recipe(tmp_path / "l.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("recipe.yaml")), ids=str)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.data.train.is_file()
    assert recipe.data.test is None or recipe.data.test.is_file()


def test_licence_policy_refuses_gemma_until_accepted():
    from tuneloop.models import licences

    recipe = recipe_from_dict({**MINIMAL, "base_model": "gemma3-270m"})
    with pytest.raises(TuneloopError) as err:
        licences.check(recipe.base_model, recipe.allowed_licences, recipe.accept_licences)
    assert "Gemma Terms of Use" in str(err.value) and "accept_licences" in str(err.value)
    accepted = recipe_from_dict({**MINIMAL, "base_model": "gemma3-270m",
                                 "accept_licences": ["Gemma Terms of Use"]})
    assert licences.check(accepted.base_model, accepted.allowed_licences,
                          accepted.accept_licences)["restricted"] is True
    assert licences.check("smollm2-135m-instruct", recipe.allowed_licences, [])["name"] == "Apache-2.0"
    assert licences.check("/some/local/folder", [], [])["restricted"] is None
