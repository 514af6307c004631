"""How each method trains, by name: one `Trainer` each, beside its facts in tuneloop.methods.

A trainer's `train(recipe, splits, run_dir, ctx)` returns {"model", "tokenizer", "stats",
"artifact"} and `test(out, recipe, splits, ctx)` the test set's evaluation; `weights` is how its
model is loaded, made trainable and saved (the supervised loop's `Weights`), and `footprint`
what `tuneloop estimate` counts for it. A new method is a module with its trainer and one line
here (docs/layout.md, "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from tuneloop.methods import method
from tuneloop.train import full, lora, qlora
from tuneloop.train.full import FULL
from tuneloop.train.lora import DORA, LORA
from tuneloop.train.qlora import QLORA
from tuneloop.train.sft import Weights, run_sft


@dataclass
class Context:
    """What a run hands its method besides the recipe and the data."""

    registry: object = None
    workspace: Path | None = None
    progress: Callable | None = None  # progress(step, steps, loss, tokens_per_s)
    on_validation: Callable | None = None  # on_validation(step, loss); may raise to stop
    on_phase: Callable = field(default=lambda name: None)
    resume: bool = False
    rank: int = 0  # with world > 1: this process among the data-parallel ranks
    world: int = 1
    shard: str | None = None  # "fsdp", "zero2", "zero3"


def supervised(weights: Weights, recipe, splits, run_dir: Path, ctx: Context) -> dict:
    """The supervised loop (train/sft.py) with `weights`; "training RUN" is the phase."""
    ctx.on_phase(f"training {run_dir.name}")
    return run_sft(weights, recipe, splits, run_dir, ctx.progress, resume=ctx.resume,
                   on_validation=ctx.on_validation, rank=ctx.rank, world=ctx.world,
                   shard=ctx.shard)


def score_answers(out: dict, recipe, splits, ctx: Context) -> dict:
    """The test rows' answers, scored with the task's metrics and the recipe's evaluators."""
    from tuneloop.evaluate import custom
    from tuneloop.evaluate.runner import score

    ev = score(out["model"], out["tokenizer"], splits.test, splits.info)
    if recipe.evaluators:
        ev["metrics"]["custom"] = custom.apply(recipe.evaluators, splits.test, ev["predictions"])
    return ev


@dataclass(frozen=True)
class Trainer:
    """How one method trains and is tested."""

    train: Callable  # train(recipe, splits, run_dir, ctx) -> out
    test: Callable = score_answers  # test(out, recipe, splits, ctx) -> {"metrics", "predictions"}
    weights: Weights | None = None  # (methods on the supervised loop)
    footprint: Callable | None = None  # estimate's parts: see train/estimate.py


def _dpo(recipe, splits, run_dir: Path, ctx: Context) -> dict:
    from tuneloop.train.dpo import run_dpo

    ctx.on_phase(f"training {run_dir.name}")
    return run_dpo(recipe, splits, run_dir, ctx.progress, resume=ctx.resume,
                   registry=ctx.registry, rank=ctx.rank, world=ctx.world,
                   on_validation=ctx.on_validation)


def _dpo_test(out: dict, recipe, splits, ctx: Context) -> dict:
    """The test pairs against the start point (`dpo.start`'s adapter, else the base), read from
    the recipe: a run in several processes returns no `start` of its own."""
    from tuneloop.evaluate.pairs import evaluate_pairs
    from tuneloop.train.dpo import start_run

    start = start_run(recipe, ctx.registry)
    return evaluate_pairs(out["model"], out["tokenizer"], splits.test, beta=recipe.dpo.beta,
                          start_adapter=start.adapter_path if start else None)


def _distill(recipe, splits, run_dir: Path, ctx: Context) -> dict:
    from tuneloop.train.distill import DISTILL, distill_stats, prepare_distillation

    splits, loss_fn, teacher = prepare_distillation(recipe, splits, ctx.registry, ctx.on_phase,
                                                    ctx.workspace)
    ctx.on_phase(f"training {run_dir.name}")
    out = run_sft(DISTILL, recipe, splits, run_dir, ctx.progress, resume=ctx.resume,
                  on_validation=ctx.on_validation, loss_fn=loss_fn)
    out["stats"].update(distill_stats(out, teacher, splits, recipe))
    return out


def _on(weights: Weights, footprint: Callable) -> Trainer:
    return Trainer(partial(supervised, weights), weights=weights, footprint=footprint)


TRAINERS: dict[str, Trainer] = {
    "lora": _on(LORA, lora.footprint), "dora": _on(DORA, partial(lora.footprint, dora=True)),
    "qlora": _on(QLORA, qlora.footprint), "full": _on(FULL, full.footprint),
    "dpo": Trainer(_dpo, test=_dpo_test),
    "distill": Trainer(_distill),
}
# The supervised methods' model setups, by name (benches and `estimate` time them alone).
WEIGHTS = {name: t.weights for name, t in TRAINERS.items() if t.weights is not None}


def trainer(name: str) -> Trainer:
    """The trainer of method `name` (an unknown name: the method table's clear error)."""
    method(name)
    return TRAINERS[name]
