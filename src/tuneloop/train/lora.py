"""LoRA and DoRA: low-rank adapters on a frozen base model (PEFT), saved as a PEFT adapter.

DoRA splits each adapted weight into magnitude and direction and trains both (LoRA on the
direction); it costs more per step than LoRA and often learns more per step.
"""

from __future__ import annotations

from functools import partial

from peft import LoraConfig, get_peft_model

from tuneloop import models
from tuneloop.train.plan import LORA_LR
from tuneloop.train.sft import Method, run_sft


def attach_lora(model, rank: int, alpha: float, dropout: float, targets, dora: bool = False):
    """Wrap a causal LM with fresh LoRA (or DoRA) adapters; only they are trainable."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none", use_dora=dora)
    return get_peft_model(model, config)


def load_base(recipe):
    return models.load_model(recipe.base_model)


def prepare(model, recipe, plan, dora: bool = False):
    return attach_lora(model, plan.lora_rank, plan.lora_alpha, recipe.lora.dropout,
                       recipe.lora.targets, dora=dora)


def save_adapter(model, tokenizer, folder) -> None:
    model.save_pretrained(folder, safe_serialization=True)


LORA = Method("lora", LORA_LR, load_base, prepare, save_adapter)
DORA = Method("dora", LORA_LR, load_base, partial(prepare, dora=True), save_adapter)
run_lora = partial(run_sft, LORA)
