"""Custom evaluators: built-ins, a function from a file named in the recipe, and clear errors."""

from __future__ import annotations

import pytest
import yaml

from tuneloop.core.formats import Example
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import custom


def rows():
    examples = [Example(messages=({"role": "user", "content": "q1"},), answer="a", line=1),
                Example(messages=({"role": "user", "content": "q2"},), answer="b", line=2)]
    preds = [{"line": 1, "output": '{"x": 1}', "prediction": "a", "gold": "a"},
             {"line": 2, "output": "not json at all", "prediction": "c", "gold": "b"}]
    return examples, preds


def test_builtins_average_over_rows():
    examples, preds = rows()
    out = custom.apply(["json_object", "answer_length"], examples, preds)
    assert out["json_object"] == {"valid": 0.5}
    assert out["answer_length"] == {"chars": (8 + 15) / 2, "words": (2 + 4) / 2}


def test_a_function_from_a_file_next_to_the_recipe(tmp_path, tiny_model, classify_files,
                                                   workspace):
    from tuneloop.project import load_recipe
    from tuneloop.train.run import train

    (tmp_path / "checks.py").write_text(
        "def mentions_card(example, prediction):\n"
        "    return {'card_in_input': 'card' in example.text, "
        "'right': prediction['prediction'] == prediction['gold']}\n")
    train_file, test_file = classify_files
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "task": "classify", "max_steps": 1, "baselines": [],
        "forgetting": {"enabled": False}, "evaluators": ["checks.py:mentions_card"],
        "data": {"train": str(train_file), "test": str(test_file)}}))
    result = train(load_recipe(recipe_file), workspace=workspace)
    values = result["test"]["custom"]["%s:mentions_card" % (tmp_path / "checks.py")]
    assert values["right"] == pytest.approx(result["accuracy"])
    card = sum("card" in line for line in test_file.read_text().splitlines()) / 12
    assert values["card_in_input"] == pytest.approx(card)


def test_evaluator_errors_name_the_evaluator_and_the_row(tmp_path):
    examples, preds = rows()
    with pytest.raises(TuneloopError, match="not a built-in"):
        custom.resolve("no_such_check")
    with pytest.raises(TuneloopError, match="cannot load"):
        custom.resolve("missing_module_xyz:f")
    (tmp_path / "bad.py").write_text("def boom(example, prediction):\n    return 1 / 0\n"
                                     "def scalar(example, prediction):\n    return 3\n")
    with pytest.raises(TuneloopError, match="'.*bad.py:boom' failed on test line 1: "
                                            "ZeroDivisionError"):
        custom.apply([f"{tmp_path}/bad.py:boom"], examples, preds)
    with pytest.raises(TuneloopError, match="returned int on test line 1"):
        custom.apply([f"{tmp_path}/bad.py:scalar"], examples, preds)
    with pytest.raises(TuneloopError, match="has no function nope"):
        custom.resolve(f"{tmp_path}/bad.py:nope")
