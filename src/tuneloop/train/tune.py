"""Hyperparameter search: each trial a run in the registry, pruned early on validation loss.

Optuna's TPE sampler proposes the learning rate, LoRA rank, epochs and batch size; a trial
reports its validation loss at every evaluation and the median pruner stops trials that lag the
others at the same step. Trials skip the test set and the baselines: the search must not see
the test data. The best trial's settings are written as a new recipe next to the original.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop import methods, project
from tuneloop.errors import TuneloopError
from tuneloop.train.run import Stopped, train


def space(trial, recipe) -> dict:
    """One trial's settings, around tuneloop's defaults for the method (the batch in examples
    per update: the micro-batch's token budget is memory only)."""
    method = methods.method(recipe.method)
    default_lr = method.learning_rate
    update = {
        "learning_rate": trial.suggest_float("learning_rate", default_lr / 10, default_lr * 3, log=True),
        "epochs": trial.suggest_int("epochs", 1, 4),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32, 64]),
    }
    if method.rank:
        rank = trial.suggest_categorical("lora_rank", [4, 8, 16, 32])
        update["lora"] = recipe.lora.model_copy(update={"rank": rank, "alpha": None})
    return update


def tune(recipe, recipe_path: Path | None, trials: int, workspace: Path | None = None,
         timeout_minutes: float | None = None, seed: int = 0, on_trial=None) -> dict:
    """Run the search; returns the trials, the best one and the tuned recipe's path."""
    import optuna

    if methods.method(recipe.method).trains_on != "answers":
        raise TuneloopError(f"tune searches supervised methods; not {recipe.method} yet (it "
                            "trains on preference pairs)")
    ws = workspace or project.workspace()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    rows: list[dict] = []
    base_name = recipe.name or (recipe_path.stem if recipe_path else "tune")

    def objective(trial):
        update = space(trial, recipe)
        trial_recipe = recipe.model_copy(update={
            **update, "name": f"{base_name}-trial-{trial.number}", "baselines": [],
            "data": recipe.data.model_copy(update={"test": None})})

        def report(step: int, loss: float) -> None:
            trial.report(loss, step)
            if trial.should_prune():
                raise Stopped(f"pruned at step {step} (validation loss {loss:.4f})")

        row = {"trial": trial.number, "params": dict(trial.params)}
        try:
            result = train(trial_recipe, workspace=ws, on_validation=report)
        except Stopped:
            row.update(state="pruned")
            rows.append(row)
            raise optuna.TrialPruned()
        row.update(state="complete", run_id=result["run_id"], val_loss=result["final_val_loss"],
                   steps=result["steps"], train_s=result["train_s"])
        rows.append(row)
        if on_trial:
            on_trial(row)
        if result["final_val_loss"] is None:
            raise TuneloopError("tune needs validation loss: the training data is too small "
                                "for a validation slice, or set data.validation")
        return result["final_val_loss"]

    study.optimize(objective, n_trials=trials,
                   timeout=timeout_minutes * 60 if timeout_minutes else None)
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        raise TuneloopError("no trial finished; raise --trials or the time budget")
    best = min(complete, key=lambda r: r["val_loss"])
    tuned = recipe.model_copy(update=space(optuna.trial.FixedTrial(best["params"]), recipe))
    target = None
    if recipe_path:
        target = recipe_path.with_name(recipe_path.stem + ".tuned.yaml")
        raw = json.loads(tuned.model_dump_json(exclude_defaults=True))
        raw["data"] = {k: str(v) for k, v in json.loads(recipe.data.model_dump_json()).items() if v}
        project.save_yaml(raw, target)
    return {"trials": rows, "best": best, "tuned_recipe": str(target) if target else None}
