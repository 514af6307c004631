"""Supervised fine-tuning, readable top to bottom; the methods (LoRA, DoRA, QLoRA, full) differ
only in how the model is loaded, which weights train, and what is saved (`Weights`).

The loop is plain PyTorch: length-grouped batches (no padding waste, no cross-example
attention), loss on completion tokens only with logits formed only there, AdamW with warmup
and cosine decay, gradient accumulation, validation loss, checkpoints, resume, and a fixed seed.
`run_sft` runs it in four phases: `_setup` (data, schedule, plan, model, optimizer), `_step`
(one optimizer update), `_validate` (loss, the task's metric, the best weights, early stopping)
and `_finish` (the best weights back, the artifact, the stats).
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from tuneloop import methods, models, tasks
from tuneloop.data.splits import Splits
from tuneloop.evaluate.report import plot_curves
from tuneloop.models.scoring import mean_loss
from tuneloop.project import save_yaml
from tuneloop.train import checkpoint, zero
from tuneloop.train.objective import Objective, objective_for
from tuneloop.train.plan import PACK_ROW_TOKENS, default_batch_size, make_plan
from tuneloop.train.shard import SHARDED, passes, shard_model
from tuneloop.train.steps import (compiled, deadline_of, device_batch_tokens, diagnose, improved,
                                  optimizer_step, packing, resume_from, sum_across_ranks,
                                  validation_accuracy)

WARM_STEPS = 2  # this process's first steps (compilation, allocator warm-up), timed apart


@dataclass(frozen=True)
class Weights:
    """How a method's model is loaded, made trainable and saved (its facts: tuneloop.methods).

    load(recipe) -> model; prepare(model, recipe, plan) -> model with only the weights to
    train requiring grad; save(model, folder) writes the artifact that eval and serve load.
    """

    name: str
    load: Callable
    prepare: Callable
    save: Callable

    @property
    def learning_rate(self) -> float:
        return methods.method(self.name).learning_rate

    @property
    def artifact(self) -> str:
        """The run's output folder: "adapter" or "model"."""
        return methods.method(self.name).artifact


@dataclass
class Loop:
    """A run's state between the loop's phases: what `_setup` builds and the steps advance."""

    model: object
    tokenizer: object
    objective: Objective
    train_set: list
    val_batches: list
    updates: list  # each optimizer update's micro-batches (indices into train_set)
    plan: object
    optimizer: object
    scheduler: object
    trainable: list
    step_loss: Callable
    val_loss: Callable
    engine: object = None  # DeepSpeed's, when it runs the backward and the optimizer step
    access: object = checkpoint.WHOLE  # how checkpoints read and write the trained weights
    held: int | None = None  # this rank's parameters, sharded
    task_metric: Callable | None = None
    metric_name: str | None = None  # what task_metric scores (accuracy, field_f1)
    keep_best: bool = False
    curves: dict = field(default_factory=lambda: {"train": [], "validation": []})
    tokens: int = 0
    train_s: float = 0.0
    best: dict = field(default_factory=lambda: {"loss": math.inf, "metric": None, "step": 0,
                                                "bad": 0})
    metric_curve: list = field(default_factory=list)
    warm: dict = field(default_factory=lambda: {"s": 0.0, "tokens": 0})
    first: int = 1
    stopped_early: bool = False


def run_sft(method: Weights, recipe, splits: Splits, run_dir: Path, progress=None,
            resume: bool = False, on_validation=None, rank: int = 0, world: int = 1,
            loss_fn: Callable | None = None, shard: str | None = None,
            objective: Objective | None = None) -> dict:
    """Train with `method` into run_dir/<method.artifact>; returns the run's training metrics.

    `progress(step, steps, loss, tokens_per_s)` is called after every optimizer step, and
    `on_validation(step, loss)` after every validation (it may raise to stop the run). With
    `resume`, training continues from the newest intact checkpoint in run_dir/checkpoints and
    ends with the weights and curves an uninterrupted run would have.

    `objective` says what is minimized (default: supervised fine-tuning, `Objective`);
    `loss_fn(model, batch) -> (summed loss, answer tokens)` replaces its step loss
    (distillation); validation stays the objective's. The objective also makes each update's
    micro-batches (`Objective.step_batches`), so one may produce them during training.

    With `world` > 1 (processes launched by `train.distributed`), each update's micro-batches
    are dealt out to the ranks, gradients are summed across them, and only rank 0 writes: the
    result equals one process with the same batch size. With `shard` as
    well ("fsdp", "zero2", "zero3"), the model's training state is sharded across them (FSDP,
    train/shard.py; DeepSpeed ZeRO, train/zero.py), checkpoints are gathered to rank 0, and
    only rank 0 returns a model (whole).
    """
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    writes = rank == 0
    loop = _setup(method, recipe, splits, run_dir, writes, world, loss_fn, shard, objective)
    if resume:
        loop.first, saved = resume_from(run_dir, loop.model, loop.optimizer, loop.scheduler,
                                        loop.access)
        loop.curves, loop.tokens, loop.train_s = saved["curves"], saved["tokens"], saved["train_s"]
        loop.best = {"metric": None, **saved.get("best", loop.best)}
        loop.metric_curve = saved.get("metric_curve", [])
    loop.model.train()
    deadline, step = deadline_of(recipe), loop.first
    for step in range(loop.first, loop.plan.steps + 1):
        started = time.perf_counter()
        step_loss, step_tokens = _step(loop, step, rank, world, shard)
        loop.train_s += time.perf_counter() - started
        if step < loop.first + WARM_STEPS:
            loop.warm["s"] += time.perf_counter() - started
            loop.warm["tokens"] += step_tokens
        loop.curves["train"].append((step, step_loss))
        if progress and writes:
            progress(step, loop.plan.steps, step_loss, loop.tokens / loop.train_s)
        out_of_time = deadline is not None and time.monotonic() > deadline
        if world > 1 and deadline is not None:  # every rank must stop at the same step
            out_of_time = sum_across_ranks([], [float(out_of_time)])[0] > 0
        if loop.val_batches and (step % loop.plan.eval_every == 0 or step == loop.plan.steps
                                 or out_of_time):
            _validate(loop, step, recipe, run_dir, rank, world, writes or bool(shard),
                      on_validation)
        if ((writes or shard) and step % loop.plan.checkpoint_every == 0
                and step < loop.plan.steps and not out_of_time and not loop.stopped_early):
            checkpoint.save(run_dir / "checkpoints", loop.model, loop.optimizer, loop.scheduler,
                            step, position=step,
                            loop={"curves": loop.curves, "tokens": loop.tokens,
                                  "train_s": loop.train_s, "best": loop.best,
                                  "metric_curve": loop.metric_curve},
                            access=loop.access, write=writes)
        if out_of_time or loop.stopped_early:
            break
    return _finish(loop, step, method, recipe, splits, run_dir, writes, world, shard)


def _setup(method: Weights, recipe, splits: Splits, run_dir: Path, writes: bool, world: int,
           loss_fn: Callable | None, shard: str | None, objective: Objective | None) -> Loop:
    """The data as training items, the schedule of updates, the plan, the prepared model, the
    optimizer and what sharding needs."""
    module = tasks.module(recipe.task)
    tokenizer = models.load_tokenizer(recipe.base_model)
    model = method.load(recipe)
    objective = objective or objective_for(recipe, tokenizer, splits.info)
    train_set = objective.encode(tokenizer, module, splits.info, splits.train)
    val_set = objective.encode(tokenizer, module, splits.info, splits.validation)
    max_length = recipe.max_length or max(objective.size(x) for x in train_set)
    train_set = [x for x in train_set if objective.size(x) <= max_length]
    lengths = [objective.rows * objective.size(x) for x in train_set]
    epochs = recipe.epochs or objective.epochs(len(train_set))
    batch_tokens = max(recipe.batch_tokens or device_batch_tokens(model, method.artifact),
                       objective.rows * max_length)
    batch_size = recipe.batch_size or default_batch_size(len(train_set))
    packed = packing(recipe, objective)
    if packed:
        objective.row_tokens = min(batch_tokens, max(PACK_ROW_TOKENS, objective.rows * max_length))
    updates = objective.schedule(lengths, epochs, batch_size, batch_tokens, recipe.seed,
                                 parts=world, packed=packed)
    tokens_per_step = sum(lengths) * epochs / max(1, len(updates))
    plan = make_plan(recipe, len(updates), epochs, max_length, tokens_per_step,
                     sum(p.numel() for p in model.parameters()), method.learning_rate,
                     batch_size=batch_size, batch_tokens=batch_tokens, packing=packed,
                     info=splits.info)
    if writes:  # the resolved settings, readable while the run trains
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml({"recipe": json.loads(recipe.model_dump_json()), "plan": plan.to_dict(),
                   "task": splits.info.to_dict()}, run_dir / "recipe.yaml")
    model = method.prepare(model, recipe, plan)
    objective.attach(model)
    pad = tokenizer.pad_token_id
    # Passes without gradients (validation, DPO's reference) in micro-batches no larger than
    # training's largest: at the device's whole token budget they would set the run's peak.
    pass_tokens = min(batch_tokens, batch_size * objective.rows * max_length)
    objective.begin(model, train_set, val_set, pass_tokens, pad)
    loop = _optimize(model, tokenizer, objective, plan, recipe, loss_fn, shard)
    loop.train_set, loop.updates = train_set, updates
    loop.val_batches = objective.batches(val_set, pad, pass_tokens)
    # The best validation so far: by the task's own metric where it has one cheap enough to
    # score at every validation (a label set's accuracy), else by loss. (Not for methods that
    # learn other answers than the data's gold ones, distillation's and DPO's.) Data-parallel
    # ranks each hold the whole model and score the same validation rows alike; sharded ones
    # do not hold it whole, and keep the best by loss.
    if methods.method(recipe.method).task_objectives and splits.validation and not shard:
        loop.metric_name, loop.task_metric = objective.task_metric(tokenizer, splits) or (
            ("accuracy", validation_accuracy(tokenizer, splits)) if splits.info.labels
            else (None, None))
    loop.keep_best = bool(recipe.patience or loop.task_metric)
    return loop


def _optimize(model, tokenizer, objective: Objective, plan, recipe, loss_fn, shard) -> Loop:
    """The step and validation losses, AdamW and its schedule, compiled or sharded as asked."""
    task_loss = objective.loss
    held, step_loss, val_loss = None, loss_fn or task_loss, objective.validation_loss(model)
    if recipe.compile:
        step_loss = compiled(step_loss, model, shard)
    if shard == "fsdp":  # the loss (distillation is refused) gathers the weights
        step_loss = val_loss = shard_model(model, task_loss)
        held = sum(p.to_local().numel() for p in model.parameters())  # this rank's shards
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps)
    engine, access = None, SHARDED if shard == "fsdp" else checkpoint.WHOLE
    if shard in zero.STAGES:  # DeepSpeed then runs the backward and the optimizer step
        engine = zero.initialize(model, task_loss, optimizer, zero.STAGES[shard])
        step_loss = val_loss = lambda _model, batch: engine(batch)
        held, access = zero.held(model), zero.Zero(engine, shard)
    return Loop(model, tokenizer, objective, [], [], [], plan, optimizer, scheduler, trainable,
                step_loss, val_loss, engine=engine, access=access, held=held)


def _step(loop: Loop, step: int, rank: int, world: int, shard: str | None) -> tuple[float, int]:
    """One optimizer update: this rank's share of its micro-batches, forward and backward,
    gradients summed across ranks, the optimizer step; (the step's mean loss, its tokens)."""
    batches = loop.objective.step_batches(loop.model, loop.updates[step - 1], loop.train_set,
                                          loop.tokenizer.pad_token_id)
    n_target = sum(loop.objective.count(b) for b in batches)
    step_loss, step_tokens = 0.0, 0
    # This rank's share of the step; sharded, every rank runs as many passes (weight 0
    # for padding) and FSDP's mean of the ranks' gradients is scaled back to their sum.
    mine = passes(batches, rank, world) if shard else [(b, 1.0) for b in batches[rank::world]]
    for batch, weight in mine:
        loss, _ = loop.step_loss(loop.model, batch)
        # mean over the step (its answer tokens; DPO: its pairs)
        scaled = loss * (weight * (world if shard else 1)) / n_target
        if loop.engine:
            loop.engine.backward(scaled, scale_wrt_gas=False)
        else:
            scaled.backward()
        if weight:
            step_loss += loss.detach().item() / n_target
            step_tokens += int(batch["attention_mask"].sum())
    if world > 1:  # every rank then holds the whole step's gradient, loss and tokens
        step_loss, step_tokens = sum_across_ranks([] if shard else loop.trainable,
                                                  [step_loss, step_tokens])
    loop.tokens += int(step_tokens)
    if loop.engine:
        zero.step(loop.engine, loop.scheduler)
    else:
        optimizer_step(loop.trainable, loop.optimizer, loop.scheduler)
    return step_loss, int(step_tokens)


def _validate(loop: Loop, step: int, recipe, run_dir: Path, rank: int, world: int,
              saves: bool, on_validation) -> None:
    """The validation loss (and the task's metric), the best weights so far, early stopping."""
    val = mean_loss(loop.model, loop.val_batches, loop.val_loss)
    if world > 1:  # rank 0's on every rank: the ranks must decide alike from it
        val = sum_across_ranks([], [val if rank == 0 else 0.0])[0]  # (stop, gather)
    loop.curves["validation"].append((step, val))
    metric = loop.task_metric(loop.model) if loop.task_metric else None
    if metric is not None:
        loop.metric_curve.append((step, metric))
    if on_validation:
        on_validation(step, val)
    if not loop.keep_best:
        return
    if improved(val, metric, loop.best, recipe.min_delta):
        loop.best = {"loss": val, "metric": metric, "step": step, "bad": 0}
        if saves:
            checkpoint.save_weights(loop.model, run_dir / "checkpoints" / "best.safetensors",
                                    loop.access, write=rank == 0)
    else:
        loop.best["bad"] += 1
        loop.stopped_early = bool(recipe.patience) and loop.best["bad"] >= recipe.patience


def _finish(loop: Loop, step: int, method: Weights, recipe, splits: Splits, run_dir: Path,
            writes: bool, world: int, shard: str | None) -> dict:
    """The best weights back in the model, the artifact written, the run's stats."""
    best_weights = run_dir / "checkpoints" / "best.safetensors"
    use_best = bool(loop.keep_best and loop.best["step"] and loop.best["step"] != step)
    if use_best and not shard:  # (sharded, rank 0 reads them below instead of the shards)
        if world > 1:  # rank 0 may still be writing the best weights the others read
            torch.distributed.barrier()
        checkpoint.load_weights(loop.model, best_weights, loop.access)
    training_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    artifact = run_dir / method.artifact
    if shard:  # rank 0 builds the model whole from the gathered trained weights, to save it
        if use_best:  # rank 0 reads the best weights; the last are not gathered
            weights = checkpoint.read_weights(best_weights) if writes else {}
        else:
            weights = loop.access.weights(loop.model)  # (every rank calls: gathering is collective)
        loop.model = loop.optimizer = loop.scheduler = loop.engine = loop.access = None
        loop.trainable, loop.step_loss, loop.val_loss = [], None, None
        if not writes:
            return {"model": None, "stats": {}, "artifact": artifact}
        loop.model = method.prepare(method.load(recipe), recipe, loop.plan)
        loop.objective.attach(loop.model)
        checkpoint.WHOLE.load_weights(loop.model, weights)
        loop.trainable = [p for p in loop.model.parameters() if p.requires_grad]
    model, tokenizer, objective = loop.model, loop.tokenizer, loop.objective
    model.eval()
    if not writes:
        return {"model": model, "stats": {}, "artifact": artifact}
    models.save_artifact(artifact, lambda tmp: (method.save(model, tokenizer, tmp),
                                                objective.save(model, tmp)), {
        "base_model": recipe.base_model, "task": splits.info.to_dict(), "method": method.name,
        **objective.meta})
    plot_curves(loop.curves, run_dir / "loss.png")
    stats = _stats(loop, step, splits, training_rss_mb)
    (run_dir / "curves.json").write_text(json.dumps(loop.curves))
    return {"model": model, "tokenizer": tokenizer, "plan": loop.plan, "stats": stats,
            "artifact": artifact}


def _stats(loop: Loop, step: int, splits: Splits, training_rss_mb: float) -> dict:
    """The run's training figures, as the registry and the report keep them."""
    tokens, train_s, warm, best = loop.tokens, loop.train_s, loop.warm, loop.best
    return {
        "steps": step, "train_tokens": tokens, "train_s": train_s,
        "train_tokens_per_s": tokens / train_s if train_s else 0.0,
        # after this process's first WARM_STEPS steps (where compilation happens)
        "steady_tokens_per_s": ((tokens - warm["tokens"]) / (train_s - warm["s"])
                                if step >= loop.first + WARM_STEPS and train_s > warm["s"]
                                else None),
        "warmup_s": warm["s"],
        "final_train_loss": loop.curves["train"][-1][1],
        "final_val_loss": loop.curves["validation"][-1][1] if loop.curves["validation"] else None,
        "stopped_early": loop.stopped_early,
        "best_step": best["step"] or None,
        "best_val_loss": best["loss"] if best["step"] else None,
        "val_metric": loop.metric_name,  # the task metric the best weights were chosen by
        "best_val_metric": best["metric"],
        "val_metric_curve": loop.metric_curve or None,
        **({"best_val_accuracy": best["metric"], "val_accuracy_curve": loop.metric_curve or None}
           if loop.metric_name in (None, "accuracy") else {}),
        "fit": diagnose(loop.curves),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_peak_rss_mb": training_rss_mb,  # before the artifact is gathered and saved
        "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20
                        if torch.cuda.is_available() else None),
        "device": str(models.device()),
        "trainable_params": sum(p.numel() for p in loop.trainable),
        "params_held_per_rank": loop.held,
        "dropped_as_leaks": splits.dropped_as_leaks,
    }
