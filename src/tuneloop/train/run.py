"""A training run end to end: data, method, test evaluation, registry and artifacts."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from tuneloop import project
from tuneloop.errors import TuneloopError
from tuneloop.project import recipe_from_dict
from tuneloop.models import licences
from tuneloop.evaluate import custom
from tuneloop.evaluate.runner import score
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry
from tuneloop.data.formats import file_sha256
from tuneloop.train.checkpoint import FLAGS
from tuneloop.train.data import load_splits
from tuneloop.baselines.strategies import best, recipe_baselines
from tuneloop.tasks import HEADLINE
from tuneloop.train.methods import METHODS
from tuneloop.evaluate.pairs import evaluate_pairs
from tuneloop.train.dpo import run_dpo, start_run
from tuneloop.train.sft import run_sft


def gate(result: dict, baselines: dict, recipe) -> dict:
    """The fine-tune gate: does the run beat the best prompting baseline by the margin?"""
    metric = HEADLINE[recipe.task]
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
    artifact = run_dir / (METHODS[recipe.method].artifact if recipe.method in METHODS
                          else "adapter")  # (dpo's)
    model, _ = load_artifact(artifact)
    return {"model": model, "tokenizer": models.load_tokenizer(recipe.base_model),
            "stats": stats, "artifact": artifact}


def _check_sharded(recipe, processes: int, sharding: str) -> None:
    """What a sharded run (--fsdp, --deepspeed) cannot do, refused before anything starts."""
    flag = FLAGS.get(sharding)
    if flag is None:
        raise TuneloopError(f"unknown sharding {sharding!r}; use one of: "
                            + ", ".join(FLAGS.values()))
    if processes < 2:
        raise TuneloopError(f"{flag} shards the model across processes; add --processes 2 or more")
    if recipe.method not in ("full", "lora", "dora"):
        raise TuneloopError(f"{flag} trains methods full, lora and dora; method {recipe.method} "
                            f"trains without it (leave out {flag.split()[0]})")
    if sharding == "zero3" and recipe.method == "dora":
        # PEFT's DoRA reads its base layer's weight outside that layer's forward, where ZeRO-3
        # has already released it to its shards
        raise TuneloopError("--deepspeed zero3 shards each layer's weight outside its forward, "
                            "which DoRA reads; use --deepspeed zero2 or --fsdp for dora")
    if sharding in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise TuneloopError(f"{flag} needs DeepSpeed: pip install 'tuneloop[deepspeed]' "
                                "(or leave out --deepspeed: --fsdp shards without it)")


def _distill_stats(out: dict, teacher, splits, recipe) -> dict:
    """The student's mean per-token KL to the teacher on the validation answers."""
    from tuneloop.data.batching import padded_batches
    from tuneloop.data.tokenize import encode
    from tuneloop.train.distill import mean_kl

    if not splits.validation:
        return {}
    from tuneloop.tasks import TASKS

    tok, module = out["tokenizer"], TASKS[recipe.task]
    enc = [encode(tok, module.prompt(e, splits.info), module.target(e, splits.info))
           for e in splits.validation]
    kl = mean_kl(out["model"], teacher, padded_batches(enc, tok.pad_token_id))
    return {"final_val_kl": kl, "distill": recipe.distill.model_dump()}


def _forgetting(out: dict, recipe, ws: Path) -> dict:
    from tuneloop import models
    from tuneloop.evaluate import forgetting

    tokenizer = out.get("tokenizer") or models.load_tokenizer(recipe.base_model)
    return forgetting.check(out["model"], tokenizer, recipe.base_model, ws, recipe.forgetting,
                            load_base=lambda: models.load_model(recipe.base_model))


class Stopped(Exception):
    """Raised by a callback to end a run on purpose (a pruned search trial); status "stopped"."""


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
    if resume:
        run = registry.get_run(resume)
        if run.status == "done":
            raise TuneloopError(f"run {run.id} has finished; there is nothing to resume")
        recipe = recipe_from_dict({k: v for k, v in run.recipe.items()
                                   if k not in ("licence", "teachers")},
                                  source=f"run {run.id}'s recipe")
    licence = licences.check(recipe.base_model, recipe.allowed_licences, recipe.accept_licences)
    for name in recipe.evaluators:  # a missing evaluator fails now, not after training
        custom.resolve(name)
    if recipe.method == "distill" and processes > 1:
        raise TuneloopError("method distill trains in one process (the teacher sits beside the "
                            "student); leave out --processes")
    if sharding:
        _check_sharded(recipe, processes, sharding)
    phase("loading data")
    splits = load_splits(recipe.data, recipe.task, recipe.fields)
    train_sha = file_sha256(recipe.data.train)
    teachers = licences.check_teachers(
        [v.report["lineage"]["teacher"] for v in registry.versions_holding(train_sha)
         if (v.report.get("lineage") or {}).get("teacher")],
        recipe.allowed_licences, recipe.accept_licences, str(recipe.data.train))
    train_ds = registry.add_dataset(train_sha, str(recipe.data.train),
                                    len(splits.train), recipe.task)
    test_ds = (registry.add_dataset(file_sha256(recipe.data.test), str(recipe.data.test),
                                    len(splits.test), recipe.task) if recipe.data.test else None)
    if resume:
        if train_ds.id != run.train_dataset:
            raise TuneloopError(f"{recipe.data.train} changed since run {run.id} started; a "
                                "resumed run must see the same data (start a new run instead)")
        registry.update_run(run.id, status="running", error=None)
    else:
        run = registry.add_run(name=recipe.name, task=recipe.task, base_model=recipe.base_model,
                               method=recipe.method, status="running",
                               recipe={**json.loads(recipe.model_dump_json()), "licence": licence,
                                       "teachers": teachers},
                               train_dataset=train_ds.id,
                               test_dataset=test_ds.id if test_ds else None,
                               started=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
    run_dir = ws / "runs" / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_run:  # callers that track the run (a fine-tuning job) learn its id before training
        on_run(run.id)
    started = time.perf_counter()
    try:
        baselines = {}
        dpo = recipe.method == "dpo"  # preferences: no prompting baselines to beat
        if recipe.data.test and recipe.baselines and not dpo:
            baselines = recipe_baselines(recipe, workspace=ws, on_phase=phase)
        distill = recipe.method == "distill"
        if distill:
            from tuneloop.train.distill import DISTILL, prepare_distillation

            splits, loss_fn, teacher = prepare_distillation(recipe, splits, registry, phase, ws)
        phase(f"training {run.id}")
        if distill:
            out = run_sft(DISTILL, recipe, splits, run_dir, progress, resume=bool(resume),
                          on_validation=on_validation, loss_fn=loss_fn)
            out["stats"].update(_distill_stats(out, teacher, splits, recipe))
        elif processes > 1:  # (DPO too: train/distributed.py runs its objective)
            out = _distributed(recipe, run_dir, processes, bool(resume), sharding)
        elif dpo:
            out = run_dpo(recipe, splits, run_dir, progress, resume=bool(resume),
                          registry=registry, on_validation=on_validation)
        else:
            out = run_sft(METHODS[recipe.method], recipe, splits, run_dir, progress,
                          resume=bool(resume), on_validation=on_validation)
        result = {"run_id": run.id, "run_dir": str(run_dir), "method": recipe.method,
                  "artifact": str(out["artifact"]), **out["stats"]}
        if recipe.method == "qlora":  # evaluated and served on the unquantized base: the
            # run's own figures are of that model, not of the 4-bit one it trained against
            from tuneloop.models import load_artifact

            out["model"] = load_artifact(Path(out["artifact"]))[0]
        if splits.test:
            phase("evaluating on the test set")
            if dpo:
                begun = start_run(recipe, registry)
                start = begun.adapter_path if begun else None
                ev = evaluate_pairs(out["model"], out["tokenizer"], splits.test,
                                    beta=recipe.dpo.beta, start_adapter=start)
            else:
                ev = score(out["model"], out["tokenizer"], splits.test, splits.info)
                if recipe.evaluators:
                    ev["metrics"]["custom"] = custom.apply(recipe.evaluators, splits.test,
                                                           ev["predictions"])
            record_evaluation(registry, run_dir / "test", ev, model=run.id, run_id=run.id,
                              dataset=test_ds.id, strategy="fine-tuned", task=recipe.task)
            result["test"] = ev["metrics"]
            result.update({k: v for k, v in ev["metrics"].items() if not isinstance(v, dict)})
            if baselines:
                result["baselines"] = baselines
                result["gate"] = gate(result, baselines, recipe)
        if recipe.forgetting.enabled:
            phase("the forgetting check: base vs fine-tuned on the general suite")
            result["forgetting"] = _forgetting(out, recipe, ws)
        result["wall_s"] = time.perf_counter() - started
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        registry.update_run(run.id, status="done", metrics=result, wall_s=result["wall_s"],
                            adapter_path=str(out["artifact"]),
                            finished=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
    except BaseException as exc:
        status = ("cancelled" if isinstance(exc, KeyboardInterrupt)
                  else "stopped" if isinstance(exc, Stopped) else "failed")
        registry.update_run(run.id, status=status, error=f"{type(exc).__name__}: {exc}"[:4000],
                            finished=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
        raise
    from tuneloop.evaluate import run_report

    result["report"] = str(run_report.write(run.id, registry, ws)[0])
    return result
