"""DPO: learn from preference pairs ({prompt, chosen, rejected}) without a reward model.

The policy is a LoRA adapter: fresh on the base model, or continuing a finished SFT run's
adapter (`dpo.start`). The reference is the frozen start point; its log-probabilities of every
pair are computed once before the first step, so no second copy of the weights is kept.
Loss per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi/ref are the
summed log-probabilities of the chosen (c) and rejected (r) replies.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from tuneloop import models
from tuneloop.data.batching import collate, length_grouped_batches
from tuneloop.data.tokenize import encode
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.report import plot_curves
from tuneloop.project import save_yaml
from tuneloop.train import checkpoint
from tuneloop.train.lora import attach_lora, save_adapter
from tuneloop.evaluate.pairs import all_logps, dpo_loss, encode_pairs, pair_logps, preference_metrics
from tuneloop.train.plan import (default_batch_size, default_batch_tokens, default_epochs,
                                 make_plan)
from tuneloop.train.sft import (diagnose, optimizer_step, resume_from, schedule,
                                 write_atomically)

DPO_LR = 5e-5  # LoRA-DPO: well below SFT's 1e-3, since the start point is already good


def load_policy(recipe, registry=None):
    """The base model with a trainable adapter: fresh, or a copy of the start run's."""
    base = models.load_model(recipe.base_model)
    if not recipe.dpo.start:
        return base, None
    from peft import PeftModel

    from tuneloop import project
    from tuneloop.store import Registry

    run = (registry or Registry.open(project.workspace())).get_run(recipe.dpo.start)
    if run.status != "done" or run.method not in ("lora", "dora", "qlora", "dpo"):
        raise TuneloopError(f"dpo.start must be a finished adapter run (lora, dora, qlora or "
                            f"dpo); {run.id} is a {run.status} {run.method} run")
    if run.base_model != recipe.base_model:
        raise TuneloopError(f"dpo.start run {run.id} was trained on {run.base_model}, not "
                            f"{recipe.base_model}; set base_model to match")
    return PeftModel.from_pretrained(base, run.adapter_path, is_trainable=True), run


def run_dpo(recipe, splits, run_dir: Path, progress=None, resume: bool = False,
            registry=None) -> dict:
    """Train a DPO adapter into run_dir/adapter; returns the run's training metrics."""
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    tokenizer = models.load_tokenizer(recipe.base_model)
    model, start = load_policy(recipe, registry)
    train_pairs = encode_pairs(tokenizer, splits.train)
    val_pairs = encode_pairs(tokenizer, splits.validation)
    max_length = recipe.max_length or max(max(len(c), len(r)) for c, r in train_pairs)
    keep = [i for i, (c, r) in enumerate(train_pairs) if max(len(c), len(r)) <= max_length]
    train_pairs = [train_pairs[i] for i in keep]
    lengths = [2 * max(len(c), len(r)) for c, r in train_pairs]
    epochs = recipe.epochs or min(default_epochs(len(train_pairs)), 1.0)
    batch_tokens = max(recipe.batch_tokens or default_batch_tokens(), 2 * max_length)
    batch_size = recipe.batch_size or default_batch_size(len(train_pairs))
    updates = schedule(lengths, epochs, batch_size, batch_tokens, recipe.seed)
    tokens_per_step = sum(lengths) * epochs / max(1, len(updates))
    plan = make_plan(recipe, len(updates), epochs, max_length, tokens_per_step,
                     sum(p.numel() for p in model.parameters()), DPO_LR, batch_size=batch_size,
                     batch_tokens=batch_tokens)
    # the resolved settings, readable while the run trains
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml({"recipe": json.loads(recipe.model_dump_json()), "plan": plan.to_dict(),
               "task": splits.info.to_dict()}, run_dir / "recipe.yaml")
    if start is None:
        model = attach_lora(model, plan.lora_rank, plan.lora_alpha, recipe.lora.dropout,
                            recipe.lora.targets)
    pad, beta = tokenizer.pad_token_id, recipe.dpo.beta
    # The reference is the start point: a fresh adapter adds nothing yet (B = 0), a start run's
    # adapter is exactly where training begins.
    ref_train = all_logps(model, train_pairs, batch_tokens, pad)
    ref_val = all_logps(model, val_pairs, batch_tokens, pad) if val_pairs else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps)

    curves = {"train": [], "validation": []}
    tokens, train_s, first = 0, 0.0, 1
    if resume:
        first, loop = resume_from(run_dir, model, optimizer, scheduler)
        curves, tokens, train_s = loop["curves"], loop["tokens"], loop["train_s"]
    model.train()
    for step in range(first, plan.steps + 1):
        started = time.perf_counter()
        group = updates[step - 1]
        n_pairs = sum(len(b) for b in group)
        step_loss = 0.0
        for idx in group:
            chosen, rejected = pair_logps(model, train_pairs, idx, pad)
            policy = torch.stack([chosen, rejected], dim=1)
            loss = dpo_loss(policy, ref_train[idx].to(policy.device), beta).sum() / n_pairs
            loss.backward()
            step_loss += loss.item()
            tokens += sum(len(train_pairs[i][0]) + len(train_pairs[i][1]) for i in idx)
        optimizer_step(trainable, optimizer, scheduler)
        train_s += time.perf_counter() - started
        curves["train"].append((step, step_loss))
        if progress:
            progress(step, plan.steps, step_loss, tokens / train_s)
        if ref_val is not None and (step % plan.eval_every == 0 or step == plan.steps):
            val = all_logps(model, val_pairs, batch_tokens, pad)
            curves["validation"].append((step, float(dpo_loss(val, ref_val, beta).mean())))
        if step % plan.checkpoint_every == 0 and step < plan.steps:
            checkpoint.save(run_dir / "checkpoints", model, optimizer, scheduler, step,
                            position=step,
                            loop={"curves": curves, "tokens": tokens, "train_s": train_s})

    model.eval()
    artifact = run_dir / "adapter"
    write_atomically(artifact, lambda tmp: save_adapter(model, tokenizer, tmp), {
        "base_model": recipe.base_model, "task": splits.info.to_dict(), "method": "dpo",
        "beta": beta, "start": start.id if start else None,
        "start_adapter": start.adapter_path if start else None})
    plot_curves(curves, run_dir / "loss.png")
    stats = {
        "steps": plan.steps, "train_tokens": tokens, "train_s": train_s,
        "train_tokens_per_s": tokens / train_s if train_s else 0.0,
        "final_train_loss": curves["train"][-1][1] if curves["train"] else None,
        "final_val_loss": curves["validation"][-1][1] if curves["validation"] else None,
        "fit": diagnose(curves), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in trainable), "device": str(models.device()),
        "dropped_as_leaks": splits.dropped_as_leaks,
    }
    (run_dir / "curves.json").write_text(json.dumps(curves))
    return {"model": model, "tokenizer": tokenizer, "plan": plan, "stats": stats,
            "artifact": artifact, "start": start}
