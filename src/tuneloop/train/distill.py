"""Knowledge distillation (`method: distill`): a student LoRA learns from a teacher model.

Sequence-level: the teacher answers every training input (greedy) and the student is trained
on those answers; this works whatever the two tokenizers are. Logit-level (the default when
teacher and student share a tokenizer): at every answer token the student's distribution is
also pulled towards the teacher's, by the KL divergence over the teacher's top-k tokens (or the
whole vocabulary), which carries far more information per token than the one chosen token.

    loss = weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * CE(student, teacher's answer)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tuneloop import tasks
from tuneloop.errors import TuneloopError
from tuneloop.models.scoring import answer_hidden, over_rows
from tuneloop.train.lora import LORA

DISTILL = replace(LORA, name="distill")


def load_teacher(recipe, registry):
    """(model, tokenizer, TaskInfo or None) of the recipe's teacher: a run or a model."""
    from tuneloop.tasks.trained import load_for_answers

    model, tokenizer, info, run = load_for_answers(recipe.distill.teacher, registry)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tokenizer, info, run


def shares_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def teacher_answers(model, tokenizer, examples, info, teacher_info, max_new_tokens: int,
                    cache=None, teacher_id: str = ""):
    """The examples with their answers replaced by the teacher's greedy replies to them, and
    how many of those replies came from the cache.

    With a `cache` (synth's request cache), replies are looked up by (teacher, prompt, limit)
    and only the missing ones generated, so a second student of the same teacher, or a run
    resumed after a crash, does not ask again."""
    from tuneloop.models.generate import generate
    from tuneloop.synth.teacher import Reply

    module = tasks.module(info.kind)
    # A teacher fine-tuned on this task gets its training prompt; any other model the prompt
    # that names the labels / fields.
    zero_shot = teacher_info is None or teacher_info.kind != info.kind
    prompts = [module.prompt(e, info, zero_shot=zero_shot) for e in examples]
    keys = [hashlib.sha256(json.dumps(["distill-greedy", teacher_id, p, max_new_tokens],
                                      sort_keys=True, default=str).encode()).hexdigest()
            for p in prompts]
    replies = [None] * len(prompts)
    if cache is not None:
        for i, key in enumerate(keys):
            if (hit := cache.get(key)) is not None:
                replies[i] = hit.text
    missing = [i for i, r in enumerate(replies) if r is None]
    if missing:
        fresh, _ = generate(model, tokenizer, [prompts[i] for i in missing], max_new_tokens)
        for i, reply in zip(missing, fresh):
            replies[i] = reply
            if cache is not None:
                cache.put(keys[i], Reply(reply, 0, 0, False))
    out = []
    for e, reply in zip(examples, replies):
        reply = reply.strip()
        out.append(module.with_answer(e, reply, info))
    return out, len(examples) - len(missing)


def _kl(student_logits, teacher_logits, top_k: int | None, temperature: float):
    """KL(teacher || student) at each answer position at `temperature`: over the whole
    vocabulary, or over the teacher's top-k tokens plus one bucket for all the others (zero
    exactly when the student matches the teacher on those k + 1 outcomes)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if not top_k or top_k >= log_p.shape[-1]:
        return (log_p.exp() * (log_p - s)).sum(-1)
    log_p_k, index = log_p.topk(top_k, dim=-1)
    log_q_k = s.gather(-1, index)
    p_rest = (1 - log_p_k.exp().sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q_k.exp().sum(-1)).clamp_min(1e-12)
    return ((log_p_k.exp() * (log_p_k - log_q_k)).sum(-1)
            + p_rest * (p_rest.log() - q_rest.log()))


def _teacher_logits(teacher, hidden):
    with torch.no_grad():  # (also when the chunk is formed again in the backward pass)
        return over_rows(teacher, lambda logits: logits, hidden)


def distill_loss(model, batch, teacher, top_k: int | None, temperature: float, weight: float):
    """(summed loss over answer tokens, their count): the KL to the teacher mixed with the
    cross-entropy of the batch's answers (the teacher's own, for sequence-level targets).
    Both models' logits are formed a chunk of answer rows at a time (models/scoring.py)."""
    hidden, targets, _ = answer_hidden(model, batch)
    with torch.no_grad():
        teacher_hidden, _, _ = answer_hidden(teacher, batch)

    def loss(logits, teacher_hidden, targets):
        kl = _kl(logits, _teacher_logits(teacher, teacher_hidden), top_k, temperature)
        ce = F.cross_entropy(logits, targets, reduction="none")
        return weight * kl * temperature ** 2 + (1 - weight) * ce

    return over_rows(model, loss, hidden, teacher_hidden, targets).sum(), int(targets.numel())


@torch.no_grad()
def mean_kl(student, teacher, batches) -> float:
    """Mean per-token KL(teacher || student) over the whole vocabulary (validation)."""
    total, count = 0.0, 0
    student.eval()
    for batch in batches:
        hidden, targets, _ = answer_hidden(student, batch)
        teacher_hidden, _, _ = answer_hidden(teacher, batch)
        kl = over_rows(student, lambda s, h: _kl(s, _teacher_logits(teacher, h), None, 1.0),
                       hidden, teacher_hidden)
        total += float(kl.sum())
        count += int(targets.numel())
    return total / count if count else float("nan")


def prepare_distillation(recipe, splits, registry, on_phase, workspace=None):
    """Load the teacher, check the tokenizers, and rewrite the splits' answers as the
    teacher's; returns (splits, loss_fn or None for sequence-level, teacher model, tokenizer)."""
    from tuneloop import models
    from tuneloop.evaluate.runner import max_new_tokens
    from tuneloop.models import licences

    spec = recipe.distill
    on_phase(f"loading the teacher {spec.teacher}")
    teacher, teacher_tok, teacher_info, run = load_teacher(recipe, registry)
    # The teacher's outputs train the student: its licence must be allowed like a base model's.
    licences.check(run.base_model if run else spec.teacher, recipe.allowed_licences,
                   recipe.accept_licences)
    student_tok = models.load_tokenizer(recipe.base_model)
    same = shares_tokenizer(teacher_tok, student_tok)
    if spec.mode == "logits" and not same:
        raise TuneloopError(f"logit distillation needs the teacher ({spec.teacher}) and the "
                            f"student ({recipe.base_model}) to share a tokenizer, and they do "
                            "not; use distill: {mode: sequence}")
    if spec.targets == "teacher":
        from tuneloop.synth.teacher import Cache, request_cache_path

        on_phase("the teacher answers the training inputs")
        limit = max_new_tokens(student_tok, splits.train, splits.info)
        cache = Cache(request_cache_path(workspace)) if workspace is not None else None
        teacher_id = run.id if run else f"local:{spec.teacher}"
        try:
            (train, hits), (validation, more) = (
                teacher_answers(teacher, teacher_tok, part, splits.info, teacher_info, limit,
                                cache, teacher_id) for part in (splits.train, splits.validation))
        finally:
            if cache is not None:
                cache.close()
        if hits + more:
            on_phase(f"{hits + more} of {len(train) + len(validation)} teacher answers were "
                     "cached from an earlier run")
        # a label set stays the gold one; fields are those the teacher's answers hold
        info = (splits.info if splits.info.labels
                else tasks.describe(splits.info.kind, train, recipe.fields))
        splits = dataclasses.replace(splits, train=train, validation=validation, info=info)
    loss_fn = (partial(distill_loss, teacher=teacher, top_k=spec.top_k,
                       temperature=spec.temperature, weight=spec.weight)
               if spec.mode == "logits" else None)
    return splits, loss_fn, teacher


def distill_stats(out: dict, teacher, splits, recipe) -> dict:
    """The student's mean per-token KL to the teacher on the validation answers."""
    from tuneloop.core.batching import padded_batches
    from tuneloop.core.tokenize import encode

    if not splits.validation:
        return {}
    tok, module = out["tokenizer"], tasks.module(recipe.task)
    enc = [encode(tok, module.prompt(e, splits.info), module.target(e, splits.info))
           for e in splits.validation]
    kl = mean_kl(out["model"], teacher, padded_batches(enc, tok.pad_token_id))
    return {"final_val_kl": kl, "distill": recipe.distill.model_dump()}
