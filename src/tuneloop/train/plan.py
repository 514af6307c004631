"""Derive the knobs a user should not have to choose, from the data and the machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tuneloop import methods, tasks

# Effective training throughput used only to size a time budget before the first step
# (about 4 x params FLOPs per token for LoRA: forward plus activation gradients).
CPU_FLOPS, GPU_FLOPS = 1.0e11, 1.0e14


@dataclass
class Plan:
    epochs: float
    steps: int
    learning_rate: float
    warmup_steps: int
    batch_size: int
    batch_tokens: int
    max_length: int
    eval_every: int
    checkpoint_every: int
    lora_rank: int
    lora_alpha: float
    loss: str = "tokens"
    packing: bool = False
    head: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


def default_epochs(n_examples: int) -> float:
    """Small sets need several passes to be learned; large ones one.

    Evidence (bench/sweep.py, judged on the validation split only; bench/RESULTS.md "sweep"):
    banking77's 2,800 training rows, 77 labels, 16 examples per update: 2 epochs reached 0.83
    validation accuracy, 3 epochs 0.87, still rising; so sets under 5,000 examples take 3.
    """
    if n_examples < 5000:
        return 3.0
    return 1.0


def default_loss(task: str, method: str) -> str:
    """What a run's loss is taken over (train/loss.py): a classifier's label set, or the
    vocabulary at every answer token."""
    return "tokens"


def default_head(task: str, method: str, info=None) -> str:
    """How a model answers: the task's default head for its data (`info`; a classifier's
    "labels", a label head over the prompt's last hidden state, models/head.py) for the
    methods that train one
    (`Method.task_head`: the adapter methods); "none" (it writes its answer; a label is scored
    over the label trie) for every other task and method. Full fine-tuning keeps "none": its
    learning rate (2e-5) is too low for a head that starts at zero.

    Evidence (bench/sweep.py on banking77, judged on the validation split only; bench/RESULTS.md
    "sweep", fourth round): with the same 525 updates the head's validation accuracy was ahead
    at every evaluation (0.715 against 0.58 at update 65, 0.87 against 0.75 at 195) and ended
    at 0.885 against 0.87, while an example cost only its prompt's tokens (254k training tokens
    against 316k).
    """
    if not methods.method(method).task_head:
        return "none"
    return tasks.module(task).default_head(info)


def resolve_head(recipe, info=None) -> str:
    """The run's head: the recipe's, else the task's default for its data (`info`) where
    nothing the recipe asks for (a loss of its own, compile) rules a head out."""
    if recipe.head:
        return recipe.head
    if recipe.loss or recipe.compile:
        return "none"
    return default_head(recipe.task, recipe.method, info)


def default_batch_size(n_examples: int) -> int:
    """Examples per optimizer update, from the data alone (never from the device), so that the
    same data gets the same number of updates on a laptop and on a GPU. 16 examples per update
    is the common LoRA batch; larger sets take larger batches, which keeps the number of
    updates within a few thousand while each stays as informative."""
    if n_examples < 5000:
        return 16
    if n_examples < 50000:
        return 32
    return 64


# The memory model of a training step's activations (calibrated on SmolLM2-135M,
# bench/methods.py): eager PyTorch keeps about 16 x hidden + 7.5 x intermediate values per
# token per decoder layer for the backward pass.
ACT_HIDDEN, ACT_INTERMEDIATE = 16.0, 7.5
# The share of a GPU's free memory a micro-batch's activations may take (the memory model
# overstates by up to ~30%: bench/RESULTS.md "shapes"), and the range of sizes.
GPU_MEMORY_SHARE, GPU_BATCH_TOKENS = 0.8, (1024, 65536)


def activation_bytes(layers: int, hidden: int, intermediate: int, compute_bytes: int) -> float:
    """Bytes of activations a training token keeps for the backward pass."""
    return layers * (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * intermediate) * compute_bytes


def fitting_batch_tokens(per_token_bytes: float, free_bytes: float) -> int:
    """The largest micro-batch (tokens, a multiple of 256) whose activations fit in
    GPU_MEMORY_SHARE of `free_bytes`, within GPU_BATCH_TOKENS."""
    low, high = GPU_BATCH_TOKENS
    tokens = int(GPU_MEMORY_SHARE * max(free_bytes, 0) // per_token_bytes) // 256 * 256
    return max(low, min(high, tokens))


def default_batch_tokens() -> int:
    """Padded tokens per micro-batch without a loaded model to size them by.

    Eager PyTorch keeps ~2.5 MB of activations per token for a 135M Llama (30 layers); 768
    tokens keeps a CPU run near 3 GB while the matmuls stay large enough to run at full speed.
    On a GPU, training sizes them to the device instead (train/sft.py, fitting_batch_tokens).
    """
    return 8192 if torch.cuda.is_available() else 768


# A packed row's length: long enough that a row holds many examples, short enough that the
# block-diagonal mask's attention (computed whole by sdpa) stays small beside the matmuls.
PACK_ROW_TOKENS = 1024


def packs(packing: str, device: str) -> bool:
    """Whether a recipe's `packing` packs on `device` ("cuda", "cpu"): `auto` by device."""
    return packing == "on" or (packing == "auto" and default_packing(device))


def default_packing(device: str) -> bool:
    """`packing: auto`: packed on a GPU, padded rows on a CPU.

    Evidence (bench/train_throughput.py, bench/RESULTS.md "train_throughput"): a GPU step of a
    small model is bound by kernel launches, so fewer, fuller rows are faster; a CPU step is
    bound by arithmetic, and a packed row's attention over its whole length (sdpa computes
    the block-diagonal mask's masked blocks too) costs more than length-grouped rows' padding.
    """
    return device == "cuda"


def steps_for_budget(minutes: float, tokens_per_step: float, params: int) -> int:
    flops = GPU_FLOPS if torch.cuda.is_available() else CPU_FLOPS
    tokens_per_s = flops / (4 * params)
    return max(1, int(minutes * 60 * tokens_per_s / max(tokens_per_step, 1)))


def make_plan(recipe, n_updates: int, epochs: float, max_length: int, tokens_per_step: float,
              params: int, default_lr: float = methods.LORA_LR, batch_size: int = 16,
              batch_tokens: int | None = None, packing: bool = False, info=None) -> Plan:
    """Resolve every derived setting of a run; `n_updates` is the schedule's optimizer steps."""
    steps = max(1, n_updates)
    if recipe.time_budget_minutes:
        steps = min(steps, steps_for_budget(recipe.time_budget_minutes, tokens_per_step, params))
    if recipe.max_steps:
        steps = min(steps, recipe.max_steps)
    rank = recipe.lora.rank
    return Plan(
        epochs=epochs, steps=steps,
        learning_rate=recipe.learning_rate or default_lr,
        warmup_steps=max(1, round(recipe.warmup_ratio * steps)) if recipe.warmup_ratio else 0,
        batch_size=batch_size,
        batch_tokens=batch_tokens or recipe.batch_tokens or default_batch_tokens(),
        max_length=max_length,
        eval_every=recipe.eval_every or max(1, steps // 8),
        checkpoint_every=recipe.checkpoint_every or max(1, steps // 4),
        lora_rank=rank, lora_alpha=recipe.lora.alpha or 2.0 * rank,
        loss=recipe.loss or default_loss(recipe.task, recipe.method),
        packing=packing, head=resolve_head(recipe, info),
    )
