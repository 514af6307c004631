"""Supervised fine-tuning, readable top to bottom; the methods (LoRA, DoRA, QLoRA, full) differ
only in how the model is loaded, which weights train, and what is saved (`Method`).

The loop is plain PyTorch: length-grouped batches (no padding waste, no cross-example
attention), loss on completion tokens only with logits formed only there, AdamW with warmup
and cosine decay, gradient accumulation, validation loss, checkpoints, resume, and a fixed seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from tuneloop import models, tasks
from tuneloop.data.batching import update_batches
from tuneloop.data.tokenize import prompt_ids
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.report import plot_curves
from tuneloop.project import save_yaml
from tuneloop.train import checkpoint, zero
from tuneloop.train.data import Splits
from tuneloop.models.scoring import causal_lm, completion_loss, mean_loss
from tuneloop.train.objective import Objective, objective_for
from tuneloop.train.plan import (PACK_ROW_TOKENS, activation_bytes, default_batch_size,
                                 default_batch_tokens, fitting_batch_tokens, make_plan, packs)
from tuneloop.train.shard import SHARDED, passes, shard_model


@dataclass(frozen=True)
class Method:
    """A training method: how its model is loaded, made trainable and saved.

    load(recipe) -> model; prepare(model, recipe, plan) -> model with only the weights to
    train requiring grad; save(model, folder) writes the artifact that eval and serve load.
    `artifact` names the run's output folder ("adapter" or "model").
    """

    name: str
    learning_rate: float
    load: Callable
    prepare: Callable
    save: Callable
    artifact: str = "adapter"


def schedule(lengths: list[int], epochs: float, batch_size: int, batch_tokens: int, seed: int,
             parts: int = 1, packed: bool = False) -> list[list[list[int]]]:
    """Every optimizer update of the run as its micro-batches, epoch after epoch (a fractional
    last epoch is cut short). The updates do not depend on `batch_tokens` or `packed`
    (data.batching); their micro-batches do."""
    updates: list[list[list[int]]] = []
    for epoch in range(math.ceil(epochs)):
        epoch_updates = update_batches(lengths, batch_size, batch_tokens, seed + epoch, parts,
                                       packed=packed)
        share = min(1.0, epochs - epoch)
        updates += epoch_updates[: max(1, round(share * len(epoch_updates)))]
    return updates


def run_sft(method: Method, recipe, splits: Splits, run_dir: Path, progress=None,
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
    (distillation); validation stays the objective's.

    With `world` > 1 (processes launched by `train.distributed`), each update's micro-batches
    are dealt out to the ranks, gradients are summed across them, and only rank 0 writes: the
    result equals one process with the same batch size. With `shard` as
    well ("fsdp", "zero2", "zero3"), the model's training state is sharded across them (FSDP,
    train/shard.py; DeepSpeed ZeRO, train/zero.py), checkpoints are gathered to rank 0, and
    only rank 0 returns a model (whole).
    """
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    module = tasks.TASKS[recipe.task]
    tokenizer = models.load_tokenizer(recipe.base_model)
    model = method.load(recipe)
    if objective is None:
        objective = objective_for(recipe, tokenizer, splits.info)

    train_set = objective.encode(tokenizer, module, splits.info, splits.train)
    val_set = objective.encode(tokenizer, module, splits.info, splits.validation)
    max_length = recipe.max_length or max(objective.size(x) for x in train_set)
    train_set = [x for x in train_set if objective.size(x) <= max_length]
    lengths = [objective.rows * objective.size(x) for x in train_set]
    epochs = recipe.epochs or objective.epochs(len(train_set))
    batch_tokens = max(recipe.batch_tokens or device_batch_tokens(model, method),
                       objective.rows * max_length)
    batch_size = recipe.batch_size or default_batch_size(len(train_set))
    packed = packing(recipe, objective)
    if packed:
        objective.row_tokens = min(batch_tokens, max(PACK_ROW_TOKENS, objective.rows * max_length))
    updates = schedule(lengths, epochs, batch_size, batch_tokens, recipe.seed, parts=world,
                       packed=packed)
    tokens_per_step = sum(lengths) * epochs / max(1, len(updates))
    n_params = sum(p.numel() for p in model.parameters())
    plan = make_plan(recipe, len(updates), epochs, max_length, tokens_per_step, n_params,
                     method.learning_rate, batch_size=batch_size, batch_tokens=batch_tokens,
                     packing=packed)
    writes = rank == 0
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
    task_loss = objective.loss
    held, step_loss_fn, val_loss_fn = None, loss_fn or task_loss, objective.validation_loss(model)
    if recipe.compile:
        step_loss_fn = compiled(step_loss_fn, model, shard)
    if shard == "fsdp":  # the loss (distillation is refused) gathers the weights
        step_loss_fn = val_loss_fn = shard_model(model, task_loss)
        held = sum(p.to_local().numel() for p in model.parameters())  # this rank's shards
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps)
    engine, access = None, SHARDED if shard == "fsdp" else checkpoint.WHOLE
    if shard in zero.STAGES:  # DeepSpeed then runs the backward and the optimizer step
        engine = zero.initialize(model, task_loss, optimizer, zero.STAGES[shard])
        step_loss_fn = val_loss_fn = lambda _model, batch: engine(batch)
        held, access = zero.held(model), zero.Zero(engine, shard)
    val_batches = objective.batches(val_set, pad, pass_tokens)

    curves = {"train": [], "validation": []}
    tokens, train_s, deadline = 0, 0.0, _deadline(recipe)
    # The best validation so far: by the task's own metric where it has one cheap enough to
    # score at every validation (classification: accuracy over the label set), else by loss.
    # (Not for distillation: its validation answers are the teacher's, not gold labels.)
    best = {"loss": math.inf, "metric": None, "step": 0, "bad": 0}
    # (Data-parallel ranks each hold the whole model and score the same validation rows alike;
    # sharded ones do not hold it whole, and keep the best by loss.)
    task_metric = (_validation_accuracy(tokenizer, splits) if recipe.task == "classify"
                   and recipe.method not in ("distill", "dpo") and splits.validation
                   and not shard else None)
    keep_best = bool(recipe.patience or task_metric)
    metric_curve: list = []
    first, stopped_early = 1, False  # sharded, every rank gathers and reads checkpoints
    if resume:
        first, loop = resume_from(run_dir, model, optimizer, scheduler, access)
        curves, tokens, train_s = loop["curves"], loop["tokens"], loop["train_s"]
        best = {"metric": None, **loop.get("best", best)}
        metric_curve = loop.get("metric_curve", [])
    model.train()
    warm = {"s": 0.0, "tokens": 0}  # this process's first steps (compilation, allocator warm-up)
    for step in range(first, plan.steps + 1):
        started = time.perf_counter()
        batches = [objective.collate([train_set[i] for i in b], pad) for b in updates[step - 1]]
        n_target = sum(objective.count(b) for b in batches)
        step_loss, step_tokens = 0.0, 0
        # This rank's share of the step; sharded, every rank runs as many passes (weight 0
        # for padding) and FSDP's mean of the ranks' gradients is scaled back to their sum.
        mine = passes(batches, rank, world) if shard else [(b, 1.0) for b in batches[rank::world]]
        for batch, weight in mine:
            loss, _ = step_loss_fn(model, batch)
            # mean over the step (its answer tokens; DPO: its pairs)
            scaled = loss * (weight * (world if shard else 1)) / n_target
            if engine:
                engine.backward(scaled, scale_wrt_gas=False)
            else:
                scaled.backward()
            if weight:
                step_loss += loss.detach().item() / n_target
                step_tokens += int(batch["attention_mask"].sum())
        if world > 1:  # every rank then holds the whole step's gradient, loss and tokens
            step_loss, step_tokens = sum_across_ranks([] if shard else trainable,
                                                      [step_loss, step_tokens])
        tokens += int(step_tokens)
        if engine:
            zero.step(engine, scheduler)
        else:
            optimizer_step(trainable, optimizer, scheduler)
        train_s += time.perf_counter() - started
        if step < first + WARM_STEPS:
            warm["s"] += time.perf_counter() - started
            warm["tokens"] += int(step_tokens)
        curves["train"].append((step, step_loss))
        if progress and writes:
            progress(step, plan.steps, step_loss, tokens / train_s)
        out_of_time = deadline is not None and time.monotonic() > deadline
        if world > 1 and deadline is not None:  # every rank must stop at the same step
            out_of_time = sum_across_ranks([], [float(out_of_time)])[0] > 0
        if val_batches and (step % plan.eval_every == 0 or step == plan.steps or out_of_time):
            val = mean_loss(model, val_batches, val_loss_fn)
            if world > 1:  # rank 0's on every rank: the ranks must decide alike from it
                val = sum_across_ranks([], [val if rank == 0 else 0.0])[0]  # (stop, gather)
            curves["validation"].append((step, val))
            metric = task_metric(model) if task_metric else None
            if metric is not None:
                metric_curve.append((step, metric))
            if on_validation:
                on_validation(step, val)
            if keep_best:
                if _improved(val, metric, best, recipe.min_delta):
                    best = {"loss": val, "metric": metric, "step": step, "bad": 0}
                    if writes or shard:
                        checkpoint.save_weights(model, run_dir / "checkpoints" / "best.safetensors",
                                                access, write=writes)
                else:
                    best["bad"] += 1
                    stopped_early = bool(recipe.patience) and best["bad"] >= recipe.patience
        if ((writes or shard) and step % plan.checkpoint_every == 0 and step < plan.steps
                and not out_of_time and not stopped_early):
            checkpoint.save(run_dir / "checkpoints", model, optimizer, scheduler, step,
                            position=step,
                            loop={"curves": curves, "tokens": tokens, "train_s": train_s,
                                  "best": best, "metric_curve": metric_curve},
                            access=access, write=writes)
        if out_of_time or stopped_early:
            break

    best_weights = run_dir / "checkpoints" / "best.safetensors"
    use_best = bool(keep_best and best["step"] and best["step"] != step)
    if use_best and not shard:  # (sharded, rank 0 reads them below instead of the shards)
        if world > 1:  # rank 0 may still be writing the best weights the others read
            torch.distributed.barrier()
        checkpoint.load_weights(model, best_weights, access)

    training_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    artifact = run_dir / method.artifact
    if shard:  # rank 0 builds the model whole from the gathered trained weights, to save it
        if use_best:  # rank 0 reads the best weights; the last are not gathered
            weights = checkpoint.read_weights(best_weights) if writes else {}
        else:
            weights = access.weights(model)  # (every rank calls: gathering is collective)
        del model, optimizer, scheduler, trainable, step_loss_fn, val_loss_fn, loss, engine, access
        if not writes:
            return {"model": None, "stats": {}, "artifact": artifact}
        model = method.prepare(method.load(recipe), recipe, plan)
        objective.attach(model)
        checkpoint.WHOLE.load_weights(model, weights)
        trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    if not writes:
        return {"model": model, "stats": {}, "artifact": artifact}
    write_atomically(artifact, lambda tmp: (method.save(model, tokenizer, tmp),
                                            objective.save(model, tmp)), {
        "base_model": recipe.base_model, "task": splits.info.to_dict(), "method": method.name,
        **objective.meta})
    plot_curves(curves, run_dir / "loss.png")
    stats = {
        "steps": step, "train_tokens": tokens, "train_s": train_s,
        "train_tokens_per_s": tokens / train_s if train_s else 0.0,
        # after this process's first WARM_STEPS steps (where compilation happens)
        "steady_tokens_per_s": ((tokens - warm["tokens"]) / (train_s - warm["s"])
                                if step >= first + WARM_STEPS and train_s > warm["s"] else None),
        "warmup_s": warm["s"],
        "final_train_loss": curves["train"][-1][1],
        "final_val_loss": curves["validation"][-1][1] if curves["validation"] else None,
        "stopped_early": stopped_early,
        "best_step": best["step"] or None,
        "best_val_loss": best["loss"] if best["step"] else None,
        "best_val_accuracy": best["metric"],
        "val_accuracy_curve": metric_curve or None,
        "fit": diagnose(curves),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_peak_rss_mb": training_rss_mb,  # before the artifact is gathered and saved
        "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20
                        if torch.cuda.is_available() else None),
        "device": str(models.device()),
        "trainable_params": sum(p.numel() for p in trainable),
        "params_held_per_rank": held,
        "dropped_as_leaks": splits.dropped_as_leaks,
    }
    (run_dir / "curves.json").write_text(json.dumps(curves))
    return {"model": model, "tokenizer": tokenizer, "plan": plan, "stats": stats,
            "artifact": artifact}


WARM_STEPS = 2


def device_batch_tokens(model, method: Method) -> int:
    """Tokens per micro-batch: on a GPU, what the memory model fits in the memory left free
    once the model is loaded (less a full fine-tune's gradients and AdamW state); on a CPU the
    fixed budget (train/plan.py)."""
    if models.device().type != "cuda":
        return default_batch_tokens()
    config = causal_lm(model).config
    text = getattr(config, "text_config", config)
    per_token = activation_bytes(text.num_hidden_layers, text.hidden_size,
                                 text.intermediate_size, compute_bytes=2)
    free = torch.cuda.mem_get_info()[0]
    if method.artifact == "model":  # every weight trains: float32 gradients and two moments
        free -= 12 * sum(p.numel() for p in model.parameters())
    return fitting_batch_tokens(per_token, free)


def compiled(step_loss: Callable, model, shard: str | None) -> Callable:
    """`compile: true`: the step loss with the model's body compiled for training
    (torch.compile, dynamic shapes: one compilation for every micro-batch size). Validation
    and evaluation stay eager: they would compile again for no gradients."""
    if step_loss is not completion_loss or shard:
        raise TuneloopError("compile: true compiles supervised fine-tuning's step on one or "
                            "more data-parallel processes; this run (DPO, distillation, loss: "
                            "labels or sharded) trains eager. Leave out compile.")
    decoder = torch.compile(causal_lm(model).get_decoder(), dynamic=True)
    return partial(completion_loss, decoder=decoder)


def packing(recipe, objective: Objective) -> bool:
    """Whether the run's micro-batches are packed: the recipe's `packing`, `auto` by device."""
    if not packs(recipe.packing, models.device().type):
        return False
    if not objective.can_pack:
        if recipe.packing == "on":
            raise TuneloopError("packing: on needs a loss that reads each token on its own; "
                                "loss: labels reads each row as one example. Set packing: "
                                "off or auto, or leave out loss.")
        return False
    return True


def _validation_accuracy(tokenizer, splits: Splits) -> Callable:
    """model -> accuracy on the validation split, decoded within the label set as at test."""
    from tuneloop.tasks.labels import LabelTrie, label_distribution

    module, info = tasks.TASKS["classify"], splits.info
    trie = LabelTrie(tokenizer, info.labels)
    prompts = [prompt_ids(tokenizer, module.prompt(e, info)) for e in splits.validation]
    golds = [info.labels.index(module.target(e)) if module.target(e) in info.labels else -1
             for e in splits.validation]

    def accuracy(model) -> float:
        model.eval()
        best = label_distribution(model, tokenizer, trie, prompts).argmax(-1).tolist()
        model.train()
        return sum(b == g for b, g in zip(best, golds)) / len(golds)

    return accuracy


def _improved(loss: float, metric: float | None, best: dict, min_delta: float) -> bool:
    """A higher task metric wins (a tie goes to the lower loss); without one, a lower loss
    by more than min_delta."""
    if metric is not None and best["metric"] is not None:
        return metric > best["metric"] or (metric == best["metric"] and loss < best["loss"])
    if metric is not None:
        return True
    return loss < best["loss"] - min_delta


def sum_across_ranks(params: list, values: list[float]) -> list[float]:
    """Sum every parameter's gradient and `values` over the ranks, in one all-reduce.

    Each rank's loss is already divided by the whole step's answer-token count, so the sum is
    exactly the single-process gradient (DDP's mean would need a world-size factor).
    """
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device if grads else models.device()  # NCCL reduces only on GPUs
    flat = torch.cat([g.reshape(-1) for g in grads]
                     + [torch.tensor(values, dtype=torch.float64, device=device).to(
                         grads[0].dtype if grads else torch.float64)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()
    return flat[offset:].tolist()


def optimizer_step(trainable, optimizer, scheduler, max_norm: float = 1.0) -> None:
    """Clip the gradient norm, step AdamW and the schedule, drop the gradients."""
    torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def resume_from(run_dir: Path, model, optimizer, scheduler,
                access: checkpoint.Whole = checkpoint.WHOLE) -> tuple[int, dict]:
    """Restore the newest intact checkpoint; (first step to run, the loop's saved state)."""
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    if ckpt is None:
        raise TuneloopError(f"{run_dir}: no intact checkpoint to resume from; start the run "
                            "again with `tuneloop train RECIPE`")
    meta = checkpoint.restore(ckpt, model, optimizer, scheduler, access)
    return meta["step"] + 1, meta["loop"]


def _deadline(recipe) -> float | None:
    if recipe.time_budget_minutes is None:
        return None
    return time.monotonic() + recipe.time_budget_minutes * 60


def diagnose(curves: dict, tolerance: float = 0.02) -> str | None:
    """Read the validation curve: "overfitting" when it ended more than 2% above its minimum
    while training loss kept falling, "underfitting" when it was still falling by more than 2%
    per evaluation at the end (more steps would help), else "good"; None without a curve."""
    val = [v for _, v in curves["validation"]]
    if len(val) < 3:
        return None
    lowest = min(val)
    train = [v for _, v in curves["train"]]
    if val[-1] > lowest * (1 + tolerance) and train[-1] < train[len(train) // 2]:
        return "overfitting"
    if val[-1] < val[-2] * (1 - tolerance):
        return "underfitting"
    return "good"


def write_atomically(target: Path, write, meta: dict) -> None:
    """`write(folder)` into a temporary folder, add tuneloop.json (task, labels/fields, base,
    method), then rename it over `target`: a crash never leaves a half-written artifact."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / "tuneloop.json").write_text(json.dumps(meta))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
