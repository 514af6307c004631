"""A training run end to end: data, method, test evaluation, registry and artifacts.

The run asks its method's entry (tuneloop.methods) what applies (baselines, processes,
sharding, an unquantized evaluation) and its trainer (train/methods.py) how to train and test.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from tuneloop import methods, project
from tuneloop.baselines.strategies import best, recipe_baselines
from tuneloop.core.formats import file_sha256
from tuneloop.data.splits import load_splits
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import custom
from tuneloop.evaluate.store import record_evaluation
from tuneloop.models import licences
from tuneloop.project import recipe_from_dict
from tuneloop.store import Registry
from tuneloop.train.checkpoint import FLAGS
from tuneloop.train.methods import Context, trainer


def gate(result: dict, baselines: dict, recipe) -> dict:
    """The fine-tune gate: does the run beat the best prompting baseline by the margin?"""
    metric = methods.headline(recipe.method, recipe.task)
    strategy, value = best(baselines, recipe.task)
    gain = result[metric] - value
    return {"metric": metric, "best_baseline": strategy, "best_baseline_value": value,
            "run_value": result[metric], "gain": gain, "margin": recipe.gate_margin,
            "passed": gain > recipe.gate_margin}


def _distributed(recipe, run_dir: Path, processes: int, resume: bool,
                 sharding: str | None) -> dict:
    """Train in `processes` processes (Accelerate), then load rank 0's artifact for the test."""
    from tuneloop import models
    from tuneloop.models import load_artifact
    from tuneloop.train.distributed import launch

    stats = launch(recipe, run_dir, processes, resume, sharding)
    artifact = run_dir / methods.method(recipe.method).artifact
    model, _ = load_artifact(artifact)
    return {"model": model, "tokenizer": models.load_tokenizer(recipe.base_model),
            "stats": stats, "artifact": artifact}


def _check_processes(recipe, processes: int, sharding: str | None) -> None:
    """What a run in several processes (--processes, --fsdp, --deepspeed) cannot do, refused
    before anything starts."""
    method = methods.method(recipe.method)
    if processes > 1 and method.one_process:
        raise TuneloopError(f"method {method.name} trains in one process ({method.one_process}); "
                            "leave out --processes")
    if not sharding:
        return
    flag = FLAGS.get(sharding)
    if flag is None:
        raise TuneloopError(f"unknown sharding {sharding!r}; use one of: "
                            + ", ".join(FLAGS.values()))
    if processes < 2:
        raise TuneloopError(f"{flag} shards the model across processes; add --processes 2 or more")
    why = dict(method.unsharded_why).get(sharding)
    if why:
        raise TuneloopError(why)
    if sharding not in method.sharding:
        able = [m.name for m in methods.METHODS.values() if sharding in m.sharding]
        raise TuneloopError(f"{flag} trains methods {', '.join(able)}; method {method.name} "
                            f"trains without it (leave out {flag.split()[0]}"
                            + (f", or use {' or '.join(FLAGS[s] for s in method.sharding)})"
                               if method.sharding else ")"))
    if sharding in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise TuneloopError(f"{flag} needs DeepSpeed: pip install 'tuneloop[deepspeed]' "
                                "(or leave out --deepspeed: --fsdp shards without it)")


def _forgetting(out: dict, recipe, ws: Path) -> dict:
    from tuneloop import models
    from tuneloop.evaluate import forgetting

    tokenizer = out.get("tokenizer") or models.load_tokenizer(recipe.base_model)
    return forgetting.check(out["model"], tokenizer, recipe.base_model, ws, recipe.forgetting,
                            load_base=lambda: models.load_model(recipe.base_model))


class Stopped(Exception):
    """Raised by a callback to end a run on purpose (a pruned search trial); status "stopped"."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _resumed_recipe(registry: Registry, run_id: str):
    """The recipe a run started with, to continue it; a finished run is refused."""
    run = registry.get_run(run_id)
    if run.status == "done":
        raise TuneloopError(f"run {run.id} has finished; there is nothing to resume")
    return run, recipe_from_dict({k: v for k, v in run.recipe.items()
                                  if k not in ("licence", "teachers")},
                                 source=f"run {run.id}'s recipe")


def _register(registry: Registry, recipe, splits, licence: str, resumed):
    """The run's row (new, or the resumed one set running again) and its test dataset."""
    train_sha = file_sha256(recipe.data.train)
    teachers = licences.check_teachers(
        [v.report["lineage"]["teacher"] for v in registry.versions_holding(train_sha)
         if (v.report.get("lineage") or {}).get("teacher")],
        recipe.allowed_licences, recipe.accept_licences, str(recipe.data.train))
    train_ds = registry.add_dataset(train_sha, str(recipe.data.train),
                                    len(splits.train), recipe.task)
    test_ds = (registry.add_dataset(file_sha256(recipe.data.test), str(recipe.data.test),
                                    len(splits.test), recipe.task) if recipe.data.test else None)
    if resumed:
        if train_ds.id != resumed.train_dataset:
            raise TuneloopError(f"{recipe.data.train} changed since run {resumed.id} started; a "
                                "resumed run must see the same data (start a new run instead)")
        registry.update_run(resumed.id, status="running", error=None)
        return resumed, test_ds
    run = registry.add_run(name=recipe.name, task=recipe.task, base_model=recipe.base_model,
                           method=recipe.method, status="running",
                           recipe={**json.loads(recipe.model_dump_json()), "licence": licence,
                                   "teachers": teachers},
                           train_dataset=train_ds.id,
                           test_dataset=test_ds.id if test_ds else None, started=_now())
    return run, test_ds


def _train_and_test(recipe, splits, run, run_dir: Path, ctx: Context, processes: int,
                    test_ds) -> dict:
    """Baselines, training, the test set and the forgetting check; the run's summary."""
    method, steps = methods.method(recipe.method), trainer(recipe.method)
    baselines = {}
    if recipe.data.test and recipe.baselines and method.baselines:
        baselines = recipe_baselines(recipe, workspace=ctx.workspace, on_phase=ctx.on_phase)
    if processes > 1:  # (every method that may: train/distributed.py runs its trainer)
        ctx.on_phase(f"training {run.id}")
        out = _distributed(recipe, run_dir, processes, ctx.resume, ctx.shard)
    else:  # (the trainer says when training starts: after a teacher has answered, say)
        out = steps.train(recipe, splits, run_dir, ctx)
    result = {"run_id": run.id, "run_dir": str(run_dir), "method": recipe.method,
              "artifact": str(out["artifact"]), **out["stats"]}
    if method.unquantized_eval:  # evaluated and served on the unquantized base: the run's
        # own figures are of that model, not of the quantized one it trained against
        from tuneloop.models import load_artifact

        out["model"] = load_artifact(Path(out["artifact"]))[0]
    if splits.test:
        ctx.on_phase("evaluating on the test set")
        ev = steps.test(out, recipe, splits, ctx)
        record_evaluation(ctx.registry, run_dir / "test", ev, model=run.id, run_id=run.id,
                          dataset=test_ds.id, strategy="fine-tuned", task=recipe.task)
        result["test"] = ev["metrics"]
        result.update({k: v for k, v in ev["metrics"].items() if not isinstance(v, dict)})
        if baselines:
            result["baselines"] = baselines
            result["gate"] = gate(result, baselines, recipe)
    if recipe.forgetting.enabled:
        ctx.on_phase("the forgetting check: base vs fine-tuned on the general suite")
        result["forgetting"] = _forgetting(out, recipe, ctx.workspace)
    return result


def train(recipe, workspace: Path | None = None, progress=None, on_phase=None,
          resume: str | None = None, on_validation=None, processes: int = 1,
          on_run=None, sharding: str | None = None) -> dict:
    """Train per recipe, evaluate on data.test, record everything in the registry.

    With `resume` (a run id) the recipe is that run's own, and training continues from its
    newest intact checkpoint. Returns the run's summary: run_id, training stats and the test
    metrics (flattened, and in full under "test").
    """
    ws = workspace or project.workspace()
    registry = Registry.open(ws)
    phase = on_phase or (lambda name: None)
    resumed = None
    if resume:
        resumed, recipe = _resumed_recipe(registry, resume)
    licence = licences.check(recipe.base_model, recipe.allowed_licences, recipe.accept_licences)
    for name in recipe.evaluators:  # a missing evaluator fails now, not after training
        custom.resolve(name)
    _check_processes(recipe, processes, sharding)
    phase("loading data")
    splits = load_splits(recipe.data, recipe.task, recipe.fields)
    run, test_ds = _register(registry, recipe, splits, licence, resumed)
    run_dir = ws / "runs" / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_run:  # callers that track the run (a fine-tuning job) learn its id before training
        on_run(run.id)
    ctx = Context(registry=registry, workspace=ws, progress=progress, on_validation=on_validation,
                  on_phase=phase, resume=bool(resume), shard=sharding)
    started = time.perf_counter()
    try:
        result = _train_and_test(recipe, splits, run, run_dir, ctx, processes, test_ds)
        result["wall_s"] = time.perf_counter() - started
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        registry.update_run(run.id, status="done", metrics=result, wall_s=result["wall_s"],
                            adapter_path=result["artifact"], finished=_now())
    except BaseException as exc:
        status = ("cancelled" if isinstance(exc, KeyboardInterrupt)
                  else "stopped" if isinstance(exc, Stopped) else "failed")
        registry.update_run(run.id, status=status, error=f"{type(exc).__name__}: {exc}"[:4000],
                            finished=_now())
        raise
    from tuneloop.evaluate import run_report

    result["report"] = str(run_report.write(run.id, registry, ws)[0])
    return result
