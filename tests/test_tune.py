"""Hyperparameter search: every trial is a run in the registry, the test set is never used,
and the best trial's settings become a loadable recipe."""

from __future__ import annotations

import yaml

from tuneloop.project import load_recipe
from tuneloop.store import Registry
from tuneloop.train.tune import tune


def test_tune_records_every_trial_and_writes_the_best_recipe(tmp_path, tiny_model, classify_files,
                                                              workspace):
    train, test = classify_files
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(tiny_model), "task": "classify",
                                    "data": {"train": str(train), "test": str(test)},
                                    "eval_every": 2, "max_steps": 6}))
    result = tune(load_recipe(path), path, trials=4, workspace=workspace)
    runs = Registry.open(workspace).list_runs()
    assert len(result["trials"]) == 4 and len(runs) == 4
    assert all(r.test_dataset is None for r in runs)  # the search never sees the test set
    assert {r.status for r in runs} <= {"done", "stopped"}
    complete = [t for t in result["trials"] if t["state"] == "complete"]
    assert result["best"]["val_loss"] == min(t["val_loss"] for t in complete)
    tuned = load_recipe(result["tuned_recipe"])
    assert tuned.learning_rate == result["best"]["params"]["learning_rate"]
    assert tuned.lora.rank == result["best"]["params"]["lora_rank"]
    assert tuned.data.test == test  # the tuned recipe still evaluates on the test set
