"""What the supervised loop (train/sft.py) uses around its steps, each on its own: the
micro-batch budget, compilation, packing, the validation metric, the best-checkpoint rule,
gradients summed across ranks, the optimizer step, resume, the deadline and the fit verdict."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from tuneloop import models, tasks
from tuneloop.core.tokenize import prompt_ids
from tuneloop.errors import TuneloopError
from tuneloop.models.scoring import causal_lm, completion_loss
from tuneloop.train import checkpoint
from tuneloop.train.objective import Objective
from tuneloop.train.plan import activation_bytes, default_batch_tokens, fitting_batch_tokens, packs


def device_batch_tokens(model, artifact: str) -> int:
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
    if artifact == "model":  # every weight trains: float32 gradients and two moments
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


def validation_accuracy(tokenizer, splits) -> Callable:
    """model -> accuracy on the validation split, decoded within the label set as at test."""
    from tuneloop.tasks.labels import LabelTrie, label_distribution

    module, info = tasks.module(splits.info.kind), splits.info
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


def improved(loss: float, metric: float | None, best: dict, min_delta: float) -> bool:
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


def deadline_of(recipe) -> float | None:
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
