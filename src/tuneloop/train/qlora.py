"""QLoRA: LoRA adapters on a base model held in 4-bit NF4 (bitsandbytes, on CUDA or CPU).

The base weights take ~0.5 byte per parameter instead of 2 (bf16) or 4 (float32); they are
dequantized block by block inside each matmul. The adapters, the optimizer and the loss stay
in full precision, and the saved adapter is an ordinary PEFT adapter: evaluation and serving
apply it to the unquantized base.

The layers left unquantized (embeddings, norms, the output head) keep the dtype they load in,
bf16 on a GPU, as in a LoRA run, and the adapters attach as LoRA's do. PEFT's
prepare_model_for_kbit_training would make those layers float32: at an 8B model's 128k
vocabulary 2.1 GB more for the embeddings and as much for the head, which autocast then copies
back to bf16 at every pass. Its other work (inputs that carry gradients) serves gradient
checkpointing, which tuneloop does not use.
"""

from __future__ import annotations

import importlib.util

import torch

from tuneloop import models
from tuneloop.errors import TuneloopError
from tuneloop.train.lora import prepare as prepare_lora
from tuneloop.train.lora import footprint as lora_footprint
from tuneloop.train.lora import save_adapter
from tuneloop.train.sft import Weights


def load_4bit(recipe):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TuneloopError("method: qlora needs bitsandbytes; install it with: "
                            "pip install 'bitsandbytes>=0.46,<1'")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if models.device().type == "cuda" else torch.float32
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    return models.load_model(recipe.base_model, dtype=compute, quantization=config)


def footprint(arch: dict, rank: int, freeze_layers: int, compute_bytes: int) -> dict:
    """LoRA's, on NF4 linears (+ double-quantized scales) with the rest unquantized; each
    matmul dequantizes its weight block by block (more work a token)."""
    parts = lora_footprint(arch, rank, freeze_layers, compute_bytes)
    linear = arch["linear_parameters"]
    return {**parts, "weights": linear * 0.52 + (arch["parameters"] - linear) * compute_bytes,
            "flops_per_param": 5.0}


QLORA = Weights("qlora", load_4bit, prepare_lora, save_adapter)
