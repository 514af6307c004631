"""The training methods by name: what every stage asks of a method, in one entry each.

A method's entry says what it trains on, what it leaves behind, how it is judged and what it
supports; callers look it up (`method(name)`) instead of comparing names. How a method trains
(loading, the trainable weights, its objective, its loop) is train-side, in `train/methods.py`,
keyed by the same name: this table sits below the recipe so the recipe, evaluation and serving
can ask it without importing training code. docs/layout.md, "Adding a method", names the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneloop import tasks

# Peak learning rates. LoRA tolerates a higher rate than full fine-tuning: its update starts at
# zero and is scaled by alpha/r; 1e-3 with alpha = 2r converges in a few hundred steps on small
# models. Full fine-tuning moves every pretrained weight, so it takes the usual 2e-5.
LORA_LR = 1e-3
FULL_LR = 2e-5
DPO_LR = 5e-5  # LoRA-DPO: well below SFT's 1e-3, since the start point is already good


@dataclass(frozen=True)
class Method:
    """One training method, as the rest of tuneloop sees it."""

    name: str
    summary: str  # one line, in the recipe's schema and `tuneloop train --help`
    learning_rate: float  # the default peak learning rate
    artifact: str = "adapter"  # the run's output: "adapter" (PEFT, on the base) or "model"
    trains_on: str = "answers"  # "answers" (supervised rows) or "pairs" (chosen, rejected)
    headline: str | None = None  # the metric that judges a run; None: the task's own
    baselines: bool = True  # prompting baselines are scored, and the gate compares with them
    one_process: str | None = None  # why it trains in one process only; None: it may train
    # in several (data parallel)
    sharding: tuple[str, ...] = ()  # the sharded modes it trains with: fsdp, zero2, zero3
    unsharded_why: tuple[tuple[str, str], ...] = ()  # (mode, the error) for a mode it refuses
    task_objectives: bool = True  # learns the data's gold answers: the task's heads and losses,
    # compile, and the best checkpoint by the task's own validation metric apply
    task_head: bool = False  # the task's default head (a label head) trains with it by default
    rank: bool = True  # low-rank adapters: a LoRA rank to set (and for `tune` to search)
    continued: bool = False  # DPO may continue from a finished run of it (dpo.start)
    unquantized_eval: bool = False  # trained against a quantized base, judged on the unquantized
    requires: tuple[tuple[str, str], ...] = ()  # (recipe key, what to write) it cannot run without

    def judged_by(self, task_headline: str) -> str:
        """The metric that judges a run of this method on a task with `task_headline`."""
        return self.headline or task_headline


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "low-rank adapters on a frozen base", LORA_LR, sharding=("fsdp", "zero2", "zero3"),
           task_head=True, continued=True),
    Method("dora", "LoRA with a trained magnitude per output row", LORA_LR,
           sharding=("fsdp", "zero2"), task_head=True, continued=True,
           # PEFT's DoRA reads its base layer's weight outside that layer's forward, where
           # ZeRO-3 has already released it to its shards
           unsharded_why=(("zero3", "--deepspeed zero3 shards each layer's weight outside its "
                                    "forward, which DoRA reads; use --deepspeed zero2 or --fsdp "
                                    "for dora"),)),
    Method("qlora", "LoRA on a 4-bit base", LORA_LR, task_head=True, continued=True,
           unquantized_eval=True),
    Method("full", "every weight", FULL_LR, artifact="model", rank=False,
           sharding=("fsdp", "zero2", "zero3")),
    Method("dpo", "preference pairs", DPO_LR, trains_on="pairs", headline="preference_accuracy",
           baselines=False, task_objectives=False, continued=True),
    Method("distill", "a LoRA student learns from distill.teacher", LORA_LR,
           one_process="the teacher sits beside the student", task_objectives=False,
           requires=(("distill.teacher", "its teacher: distill: {teacher: RUN_ID}"),)),
)}


def method(name: str) -> Method:
    """The entry of method `name`; a clear error for a name no entry holds."""
    try:
        return METHODS[name]
    except KeyError:
        from tuneloop.errors import TuneloopError

        raise TuneloopError(f"unknown method {name!r}; use one of: {', '.join(METHODS)}") from None


def headline(method_name: str, task: str) -> str:
    """The metric that judges a run of `method_name` on `task` (DPO: its pairs' accuracy)."""
    return method(method_name).judged_by(tasks.headline(task))
