"""Before a run: parameters, memory, tokens, time and money for a recipe and each method.

Counts come from the model's architecture (built on the meta device: no weights are read) and
from the recipe's data tokenized with the chat template. Memory is weights + gradients +
AdamW moments + activations (per padded token in a micro-batch) + one chunk of answer logits +
the process itself.
Throughput comes, in this order, from what the user states, from this registry's finished
runs of the same model and method on this kind of device (with as many processes, sharded
alike), or from the device's arithmetic rate at a stated efficiency: N processes on N GPUs
have N times the arithmetic, N processes on this machine share its cores (at a measured loss).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from tuneloop import models, project, tasks
from tuneloop.errors import TuneloopError
from tuneloop.models.scoring import LOGIT_CHUNK
from tuneloop.store import Registry
from tuneloop.data.splits import load_splits
from tuneloop.train.methods import TRAINERS, trainer
from tuneloop.train.objective import objective_for
from tuneloop.train.plan import (activation_bytes, default_batch_size, default_batch_tokens,
                                 default_epochs, fitting_batch_tokens, packs)

GB = 1024**3
# The methods an estimate covers: those whose trainer counts its footprint.
METHODS = tuple(name for name, t in TRAINERS.items() if t.footprint is not None)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak
    usd_per_hour: float


# Published dense bf16 peaks; prices are typical on-demand cloud rates (override with --price).
GPUS = {d.name: d for d in [
    Device("t4-16gb", 16, 65, 0.35), Device("l4-24gb", 24, 121, 0.80),
    Device("a10g-24gb", 24, 125, 1.00), Device("a100-40gb", 40, 312, 1.50),
    Device("a100-80gb", 80, 312, 2.00), Device("h100-80gb", 80, 989, 3.00),
    Device("h200-141gb", 141, 989, 4.00),
]}
PROCESS_GB = {"cpu": 0.55, "cuda": 0.0}  # interpreter + libraries (GPU: counted on the host)
CPU_EFFICIENCY, GPU_EFFICIENCY = 0.6, 0.3  # share of the arithmetic peak a training step reaches
# Small steps on GPUs are bound by per-pass overhead (kernel launches, Python), not arithmetic:
# a forward and backward pass of a micro-batch takes ~0.01 s per decoder layer at any size
# small enough (bench/RESULTS.md: 0.008 s at 135M, 30 layers; 0.014 s at the 1B shape, 16
# layers; 0.011 s at the 8B shape, 32 layers, on an H200 with LoRA).
GPU_STEP_S_PER_LAYER = 0.01
# Processes sharing one machine's cores run at this share of one process's rate (measured with
# two, bench/sharding.py: 136 against 187 tokens/s; an all-reduce per step, cores contended).
CPU_PROCESSES_EFFICIENCY = 0.73
MAX_ROWS = 64  # rows per micro-batch (data.batching)


def architecture(model: str) -> dict:
    """Parameter counts by kind, from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve(model))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    head = lm.get_output_embeddings()
    linears = [(n, m) for n, m in lm.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    text = getattr(config, "text_config", config)
    return {
        "parameters": sum(p.numel() for p in lm.parameters()),
        "linear_parameters": sum(m.weight.numel() for _, m in linears),
        "linears": [(m.in_features, m.out_features) for _, m in linears],
        "layers": text.num_hidden_layers, "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "embedding_parameters": lm.get_input_embeddings().weight.numel(),
    }


def memory(arch: dict, method: str, batch_tokens: int, rank: int, device: str,
           freeze_layers: int = 0, processes: int = 1, sharding: str | None = None) -> dict:
    """Bytes of each part of a training step's peak in one process, by method. Over several
    processes (`processes`), plain data-parallel adds the all-reduce's flat gradient buffer.
    `sharding` "fsdp" and "zero3" divide weights, gradients and optimizer state by the
    processes and add the largest part gathered whole while it runs (embeddings and head, and
    one layer); "zero2" divides gradients and optimizer state only. DeepSpeed (zero2, zero3)
    also keeps its own float32 copy of this process's share of the trained weights and one
    gradient-reduction bucket."""
    gpu = device == "cuda"
    compute_bytes = 2 if gpu else 4
    p = arch["parameters"]
    held = trainer(method).footprint(arch, rank, freeze_layers, compute_bytes)
    weights, trainable = held["weights"], held["trainable"]
    per_token = (activation_bytes(arch["layers"], arch["hidden"], arch["intermediate"], 1)
                 + held["per_token"])
    parts = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,  # AdamW: two float32 moments
        "activations": batch_tokens * per_token * compute_bytes,
        # one chunk of answer rows' logits (models/scoring.py): the head's output, then float32
        "logits": LOGIT_CHUNK * (compute_bytes + 4),
        "process": PROCESS_GB["cuda" if gpu else "cpu"] * GB,
        "parallel": 0.0,
    }
    if sharding and processes > 1:
        for part in ("gradients", "optimizer") + (("weights",) if sharding != "zero2" else ()):
            parts[part] /= processes
        if sharding != "zero2":
            layer = (p - arch["embedding_parameters"]) / arch["layers"]
            parts["parallel"] = (arch["embedding_parameters"] + layer) * weights / p
        if sharding != "fsdp":
            from tuneloop.train.zero import BUCKET

            parts["parallel"] += trainable * 4 / processes + min(trainable, BUCKET) * 4
    elif processes > 1:
        parts["parallel"] = trainable * 4  # the gradients, flattened for one all-reduce
    return {"trainable_parameters": int(trainable), "bytes": parts, "total": sum(parts.values())}


def estimate(recipe, gpu: str | None = None, methods: list[str] | None = None,
             tokens_per_s: float | None = None, price_per_hour: float | None = None,
             workspace=None, processes: int = 1, sharding: str | None = None) -> dict:
    """The estimate for each method (default: all four) on this machine or a named GPU.
    Memory is per process; with `processes` on GPUs each has its GPU (and its arithmetic), on
    this machine they share its memory and cores."""
    if gpu and gpu not in GPUS:
        raise TuneloopError(f"unknown GPU '{gpu}'; known: {', '.join(GPUS)}")
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TuneloopError(f"unknown method {unknown}; choose from {list(METHODS)}")
    arch = architecture(recipe.base_model)
    tokens, max_length, rows = _data_tokens(recipe)
    mean_length = tokens / max(rows, 1)
    epochs = recipe.epochs or default_epochs(rows)
    to_process = tokens * epochs
    kind = "cuda" if gpu else models.device().type
    if gpu:
        device = GPUS[gpu]
        capacity_gb, peak_flops, efficiency = device.memory_gb, device.bf16_tflops * 1e12, GPU_EFFICIENCY
        price = price_per_hour if price_per_hour is not None else device.usd_per_hour
        where = gpu
    else:
        import psutil

        from tuneloop.evaluate.runner import price_per_hour as default_price

        capacity_gb = psutil.virtual_memory().total / GB
        peak_flops = matmul_rate(shape=(arch["hidden"], arch["intermediate"]))
        efficiency = CPU_EFFICIENCY
        price = price_per_hour if price_per_hour is not None else default_price()
        where = f"this machine ({kind})"
    if recipe.batch_tokens or kind != "cuda":
        batch_tokens = recipe.batch_tokens or default_batch_tokens()
    else:  # as training sizes it: what fits beside the loaded bf16 weights
        batch_tokens = fitting_batch_tokens(
            activation_bytes(arch["layers"], arch["hidden"], arch["intermediate"], 2),
            capacity_gb * GB - 2 * arch["parameters"])
    batch_tokens = max(batch_tokens, max_length)
    measured = {} if gpu else _measured_rates(recipe.base_model, workspace, processes, sharding)
    # An update holds batch_size examples; a micro-batch at most those (and, in padded rows,
    # at most 64 rows), within the token budget.
    batch_size = recipe.batch_size or default_batch_size(rows)
    packed = packs(recipe.packing, kind)
    update_tokens = batch_size * mean_length
    micro_batches = max(1, math.ceil(update_tokens / batch_tokens),
                        1 if packed else math.ceil(batch_size / MAX_ROWS))
    rows_out = []
    for method in methods:
        # the largest micro-batch: the update's examples at their longest, within the budget
        step_tokens = min(batch_tokens, (batch_size if packed else min(batch_size, MAX_ROWS))
                          * max_length)
        mem = memory(arch, method, step_tokens, recipe.lora.rank, kind, recipe.full.freeze_layers,
                     processes, sharding)
        machine = mem["total"] * (1 if gpu else processes)  # what must fit in one device
        if tokens_per_s:
            rate, source = tokens_per_s, "stated"
        elif method in measured:
            rate, source = measured[method], "measured (registry)"
        else:
            # training FLOPs a token, in parameters (forward 2, activation gradients 2, weight
            # gradients 2 for full): each method's footprint says
            flops = trainer(method).footprint(arch, 1, 0, 4)["flops_per_param"]
            rate = efficiency * peak_flops / (flops * arch["parameters"])
            source = f"arithmetic ({efficiency:.0%} of peak)"
            if kind == "cuda":  # an update's tokens over its passes' overhead
                overhead_bound = update_tokens / (micro_batches * arch["layers"]
                                                  * GPU_STEP_S_PER_LAYER)
                if overhead_bound < rate:
                    rate, source = overhead_bound, "per-step overhead (small model)"
            if kind == "cuda" and processes > 1:  # a GPU each: steps run side by side
                rate, source = rate * processes, f"{source} x {processes} GPUs"
            elif processes > 1:
                rate *= CPU_PROCESSES_EFFICIENCY
                source = f"{source}, {processes} processes sharing the cores"
        seconds = to_process / rate
        rows_out.append({
            "method": method, "trainable_parameters": mem["trainable_parameters"],
            "memory_gb": {k: v / GB for k, v in mem["bytes"].items()},
            "peak_memory_gb": mem["total"] / GB, "fits": machine / GB <= capacity_gb,
            "tokens_per_s": rate, "throughput_source": source, "seconds": seconds,
            # a named GPU's price is per GPU; this machine's (--price) is the machine's
            "cost_usd": seconds / 3600 * price * (processes if gpu else 1),
        })
    return {"model": recipe.base_model, "parameters": arch["parameters"], "device": where,
            "processes": processes, "sharding": sharding,
            "memory_capacity_gb": capacity_gb, "train_rows": rows, "epochs": epochs,
            "tokens_to_process": int(to_process), "batch_tokens": batch_tokens,
            "price_per_hour": price, "methods": rows_out}


def _data_tokens(recipe) -> tuple[int, int, int]:
    """(training tokens per epoch, longest example, rows), tokenized as training will."""
    splits = load_splits(recipe.data, recipe.task, recipe.fields)
    tokenizer = models.load_tokenizer(recipe.base_model)
    module = tasks.module(recipe.task)
    objective = objective_for(recipe, tokenizer, splits.info)  # (a label head: prompts only)
    lengths = [objective.size(x) for x in
               objective.encode(tokenizer, module, splits.info, splits.train)]
    if recipe.max_length:
        lengths = [n for n in lengths if n <= recipe.max_length]
    return sum(lengths), max(lengths), len(lengths)


def _measured_rates(model: str, workspace, processes: int = 1,
                    sharding: str | None = None) -> dict[str, float]:
    """Median training tokens/s of this model's finished runs on this device, by method: runs
    with `processes` processes, sharded by `sharding`."""
    registry = Registry.open(workspace or project.workspace())
    here = str(models.device())
    rates: dict[str, list[float]] = {}
    for run in registry.list_runs(limit=500):
        m = run.metrics or {}
        ran = (m.get("processes", 1), m.get("sharding", "fsdp" if m.get("fsdp") else None))
        if (run.status == "done" and run.base_model == model and m.get("train_tokens_per_s")
                and m.get("device", "cpu") == here and m.get("train_s", 0) > 10
                and ran == (processes, sharding if processes > 1 else None)):
            rates.setdefault(run.method, []).append(m["train_tokens_per_s"])
    return {k: statistics.median(v) for k, v in rates.items()}


def matmul_rate(seconds: float = 1.0, gpu: bool = False,
                shape: tuple[int, int] = (576, 1536)) -> float:
    """Matmul FLOP/s at a training step's layer shapes (tokens x hidden -> intermediate;
    SmolLM2-135M's by default): float32 on the CPU, bf16 on the GPU with an 8k-token step.
    A CPU runs a 1B model's wider matmuls at up to twice the rate of a 135M model's."""
    tokens = 8192 if gpu else 768
    hidden, intermediate = shape
    kw = {"device": "cuda", "dtype": torch.bfloat16} if gpu else {}
    a, w = torch.randn(tokens, hidden, **kw), torch.randn(intermediate, hidden, **kw)
    for _ in range(2):
        a @ w.T
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ w.T
        n += 1
        if gpu and n % 100 == 0:
            torch.cuda.synchronize()
    if gpu:
        torch.cuda.synchronize()
    return n * 2 * tokens * hidden * intermediate / (time.perf_counter() - start)


def hours(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

