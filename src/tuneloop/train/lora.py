"""LoRA and DoRA: low-rank adapters on a frozen base model (PEFT), saved as a PEFT adapter.

DoRA splits each adapted weight into magnitude and direction and trains both (LoRA on the
direction); it costs more per step than LoRA and often learns more per step.
"""

from __future__ import annotations

from functools import partial

from peft import LoraConfig, get_peft_model

from tuneloop import models
from tuneloop.train.sft import Weights, run_sft


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


def footprint(arch: dict, rank: int, freeze_layers: int, compute_bytes: int,
              dora: bool = False) -> dict:
    """What a step holds (train/estimate.py): the base in the compute dtype, rank x (in + out)
    trainable values per adapted linear; DoRA adds a magnitude per output row, and rescales
    every adapted output (two more output-sized tensors a token)."""
    outputs = sum(o for _, o in arch["linears"])
    return {"weights": arch["parameters"] * compute_bytes,
            "trainable": sum(rank * (i + o) for i, o in arch["linears"]) + (outputs if dora else 0),
            "per_token": 2 * outputs if dora else 0,
            # forward plus activation gradients (~4 x params a token); DoRA's norms, more
            "flops_per_param": 4.6 if dora else 4.0}


LORA = Weights("lora", load_base, prepare, save_adapter)
DORA = Weights("dora", load_base, partial(prepare, dora=True), save_adapter)
run_lora = partial(run_sft, LORA)
