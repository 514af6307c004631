"""Full fine-tuning: every weight trains (optionally the embeddings and the first layers stay
frozen), in float32 master weights; saved as a complete model folder.

It needs ~16 bytes per parameter (weights, gradients, two AdamW moments) against LoRA's ~4,
and a lower learning rate, since every pretrained weight moves.
"""

from __future__ import annotations

import torch

from tuneloop import models
from tuneloop.models.scoring import causal_lm
from tuneloop.train.sft import Weights


def load_float32(recipe):
    # float32 master weights everywhere; on a GPU the loop runs the matmuls in bf16 autocast.
    return models.load_model(recipe.base_model, dtype=torch.float32)


def prepare(model, recipe, plan):
    """All weights trainable, less the input embeddings and the first `freeze_layers` layers."""
    freeze = recipe.full.freeze_layers
    model.requires_grad_(True)
    if freeze:
        decoder = causal_lm(model).get_decoder()
        decoder.get_input_embeddings().requires_grad_(False)
        for layer in decoder.layers[:freeze]:
            layer.requires_grad_(False)
    return model


def save_model(model, tokenizer, folder) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def footprint(arch: dict, rank: int, freeze_layers: int, compute_bytes: int) -> dict:
    """float32 master weights; every weight trains but the embeddings and the frozen layers
    (forward, activation and weight gradients: ~6 x params a token)."""
    p = arch["parameters"]
    per_layer = (p - arch["embedding_parameters"]) / arch["layers"]
    trainable = p - (arch["embedding_parameters"] + freeze_layers * per_layer
                     if freeze_layers else 0)
    return {"weights": p * 4, "trainable": trainable, "per_token": 0, "flops_per_param": 6.0}


FULL = Weights("full", load_float32, prepare, save_model)
