"""The recipe (tuneloop.yaml / RECIPE.yaml) and the workspace folder.

A recipe asks only for decisions a user makes (base model, task, data, method, budget);
everything else has a default derived from the data and the machine in `train.plan`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from pydantic_core import PydanticCustomError

from tuneloop import methods, tasks
from tuneloop.errors import TuneloopError
from tuneloop.models.licences import DEFAULT_ALLOWED
from tuneloop.core.files import atomic_write


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    train: Path = Field(description="JSONL training data")
    test: Path | None = Field(None, description="held-out JSONL scored after training")
    validation: Path | None = Field(None, description="JSONL for validation loss; default: "
                                    "a deterministic slice of train")
    documents: Path | None = Field(None, description="document collection for the rag baseline: "
                                   "a folder of .txt/.md files or a JSONL with \"text\"")


class LoraSpec(_Strict):
    rank: int = Field(16, gt=0, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="scaling numerator; default 2 x rank")
    # 0 by default: dropout copies every adapted layer's input (~20% of a CPU step here) and
    # buys little regularization on the short runs tuneloop plans; raise it for long runs.
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    targets: str | list[str] = Field("all-linear", description="module names, or all-linear")


class FullSpec(_Strict):
    freeze_layers: int = Field(0, ge=0, description="decoder layers (from the input) kept frozen, "
                               "with the embeddings, in full fine-tuning")


class FieldSpec(_Strict):
    name: str = Field(min_length=1, description="the key in the answer")
    type: Literal["string", "number", "list", "any"] | None = Field(
        None, description="string | number | list (several values) | any; default: the data's")
    description: str | None = Field(None, max_length=500, description="what the field holds, "
                                    "in the prompt")


class DpoSpec(_Strict):
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the start point")
    start: str | None = Field(None, description="a finished SFT run whose adapter DPO continues; "
                              "default: a fresh adapter on the base model")


class DistillSpec(_Strict):
    teacher: str | None = Field(None, description="the teacher: a finished run or a model")
    mode: Literal["logits", "sequence"] = Field(
        "logits", description="logits: also match the teacher's token distribution (needs a "
        "shared tokenizer) | sequence: learn the teacher's answers only")
    targets: Literal["teacher", "data"] = Field(
        "teacher", description="answers learned: the teacher's replies to the training inputs, "
        "or the data's own")
    top_k: int | None = Field(50, ge=1, description="KL over the teacher's top-k tokens; null: "
                              "the whole vocabulary")
    temperature: float = Field(1.0, gt=0, description="softens both distributions")
    weight: float = Field(0.5, ge=0, le=1, description="share of the KL term; the rest is the "
                          "cross-entropy of the answers")


class ForgettingSpec(_Strict):
    enabled: bool = Field(True, description="score base and fine-tuned on the general suite")
    max_accuracy_drop: float = Field(0.1, ge=0, le=1, description="flag a larger fall in "
                                     "general accuracy (absolute)")
    max_loss_increase: float = Field(0.2, ge=0, description="flag a larger rise in the loss of "
                                     "reference solutions (relative)")


class Recipe(_Strict):
    """A training run, as saved YAML. Only base_model, task and data are required."""

    base_model: str = Field("smollm2-135m-instruct", description="catalog id, folder or hub id")
    task: str = Field(description="the task kind: " + " | ".join(tasks.TASKS))
    data: DataSpec
    method: str = Field("lora", description=" | ".join(
        f"{m.name} ({m.summary})" for m in methods.METHODS.values()))
    name: str | None = Field(None, description="a label for the run")
    seed: int = Field(0, description="makes batching, init and dropout repeatable")
    epochs: float | None = Field(None, gt=0, description="passes over the data; default by size")
    max_steps: int | None = Field(None, gt=0, description="hard cap on optimizer steps")
    time_budget_minutes: float | None = Field(None, gt=0, description="stop training after this")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="peak LR; default by method")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps warming up")
    batch_size: int | None = Field(None, gt=0, description="examples per optimizer update; "
                                   "default by data size (the same on every device)")
    batch_tokens: int | None = Field(None, gt=0, description="padded tokens per micro-batch "
                                     "(memory only: an update is split into micro-batches)")
    max_length: int | None = Field(None, gt=8, description="longest example in tokens")
    eval_every: int | None = Field(None, gt=0, description="steps between validation losses")
    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    patience: int | None = Field(None, gt=0, description="early stopping: stop after this many "
                                 "validations without improvement and keep the best weights")
    min_delta: float = Field(0.0, ge=0, description="smallest validation-loss drop that counts")
    loss: Literal["tokens", "labels"] | None = Field(
        None, description="tokens: cross-entropy over the vocabulary on every answer token; "
        "labels (classify only): over the label set, where the labels branch (the probability "
        "eval and serving decide with); default by task")
    head: Literal["labels", "spans", "none"] | None = Field(
        None, description="labels (classify): a classification head (one weight row per "
        "label over the prompt's last hidden state) decides, trained with the adapter; spans "
        "(extract): a tagging head over the text's tokens finds each field's values in the "
        "text; none: the model writes its answer; default by task")
    span_context: Literal["bidirectional", "echo", "encoder", "causal"] | None = Field(
        None, description="head: spans only: how the head's pass reads the text: "
        "bidirectional (the causal mask lifted), echo (read twice, the second copy tagged), "
        "encoder (read once, then a bidirectional layer of the head's own) or causal; "
        "default echo (the best on validation, bench/span_context.py)")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="on: examples laid end to end in each micro-batch's rows, attention "
        "kept inside each example (fewer, fuller steps: faster on a GPU); off: one example per "
        "row, rows of similar length together; auto: on on a GPU, off on a CPU")
    compile: bool = Field(False, description="compile the model's body for training "
                          "(torch.compile): a first step of a minute or more, then faster "
                          "steps where a step is bound by kernel launches (small models on a "
                          "GPU); supervised methods only")
    fields: list[FieldSpec] | None = Field(None, description="extract: the answer's fields in "
                                           "order; default: the training data's keys")
    lora: LoraSpec = LoraSpec()
    full: FullSpec = FullSpec()
    dpo: DpoSpec = DpoSpec()
    distill: DistillSpec = DistillSpec()
    forgetting: ForgettingSpec = ForgettingSpec()
    evaluators: list[str] = Field(default_factory=list, description="custom checks on every test "
                                  "answer: built-in names, module:function or file.py:function")
    baselines: list[Literal["zero-shot", "few-shot", "many-shot", "similar-shot", "rag"]] = Field(
        ["zero-shot", "few-shot", "many-shot"], description="prompting strategies the run must beat")
    gate_margin: float = Field(0.0, description="the gate passes when the run's headline metric "
                               "beats the best baseline by more than this")
    many_shot_tokens: int = Field(4096, gt=64, description="prompt budget of many-shot")
    rag_passages: int = Field(4, gt=0, le=64, description="passages retrieved per question (rag)")
    allowed_licences: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED), description="base-model licences allowed")
    accept_licences: list[str] = Field(
        default_factory=list, description="further licences accepted explicitly, by name")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw):
        if isinstance(raw, dict) and "grad_accum" in raw:
            if raw["grad_accum"] == 1:  # the old default, saved with every earlier run: a
                return {k: v for k, v in raw.items() if k != "grad_accum"}  # no-op (resume)
            raise ValueError("grad_accum is gone: an optimizer update is batch_size examples "
                             "(set batch_size), split into micro-batches of batch_tokens")
        return raw

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        return _one_of(v, tasks.TASKS)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _one_of(v, methods.METHODS)

    @model_validator(mode="after")
    def _what_the_method_and_task_support(self):
        """The recipe asks only what its method and task support (each entry says what)."""
        method, task = methods.method(self.method), tasks.module(self.task)
        for key, hint in method.requires:
            section, _, field = key.partition(".")
            if not getattr(getattr(self, section), field):
                raise ValueError(f"method {self.method} needs {hint}")
        if self.compile and (not method.task_objectives or self.loss == "labels"):
            raise ValueError("compile: true compiles supervised fine-tuning's step; method "
                             f"{self.method}{' with loss: labels' if self.loss else ''} trains "
                             "eager (leave out compile)")
        if self.loss == "labels" and ("labels" not in task.LOSSES or not method.task_objectives):
            raise ValueError("loss: labels trains a classifier over its label set; task "
                             f"{self.task} with method {self.method} trains on tokens "
                             "(leave out loss)")
        if self.head not in (None, "none"):
            if self.head not in task.HEADS or not method.task_objectives:
                what = {"labels": "decides a classifier's label",
                        "spans": "finds an extractor's values in its text"}[self.head]
                raise ValueError(f"head: {self.head} {what}; task {self.task} with method "
                                 f"{self.method} writes its answer (leave out head)")
            clash = [k for k, v in (("loss", self.loss), ("compile", self.compile)) if v]
            if clash:
                raise ValueError(f"head: {self.head} trains the head's cross-entropy, eager; "
                                 f"leave out {clash[0]} (or set head: none)")
        if self.span_context and self.head != "spans":
            raise ValueError("span_context sets how a span head reads its text; it needs "
                             "head: spans (or leave out span_context)")
        return self

    @field_validator("base_model")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model, e.g. smollm2-135m-instruct")
        return v


def _one_of(value: str, registry: dict) -> str:
    """`value` if the registry holds it; else pydantic's own error for a choice."""
    if value not in registry:
        names = [repr(k) for k in registry]
        expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": expected})
    return value


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file that must hold a mapping; every way it can be wrong is a clear error."""
    if not path.is_file():
        raise TuneloopError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TuneloopError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    except UnicodeDecodeError as exc:
        raise TuneloopError(f"{path}: not UTF-8 text") from exc
    if not isinstance(raw, dict):
        raise TuneloopError(f"{path}: a recipe is a YAML mapping (key: value), got "
                            f"{type(raw).__name__}")
    return raw


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; relative data paths are relative to the file."""
    path = Path(path)
    recipe = recipe_from_dict(read_yaml_mapping(path), source=str(path))
    base = path.resolve().parent  # absolute: a resumed run may start from another folder
    data = recipe.data
    resolved = {k: (base / v if v is not None and not Path(v).is_absolute() else v)
                for k, v in data.model_dump().items()}
    evaluators = [str(base / e) if ".py:" in e and not Path(e).is_absolute() else e
                  for e in recipe.evaluators]
    return recipe.model_copy(update={"data": DataSpec(**resolved), "evaluators": evaluators})


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a mapping as a Recipe; errors name each key and how to fix it."""
    return validated(Recipe, raw, source)


def validated(model: type[BaseModel], raw, source: str):
    """`raw` as a `model` (a recipe schema), or a TuneloopError listing each problem with its
    key and fix (`source` names the file or mapping)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [explain_error(err, model) for err in exc.errors()]
        raise TuneloopError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def explain_error(err: dict, root: type[BaseModel] | None = None) -> str:
    """One validation error as a line that names the key and the fix."""
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = root or Recipe
        for part in err["loc"][:-1]:
            ann = parent.model_fields.get(str(part))
            parent = ann.annotation if ann and isinstance(ann.annotation, type) else parent
        known = list(parent.model_fields)
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(known)
        return f"  {key}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"  {key}: required; add it (see examples/ for a full recipe)"
    return f"  {key}: {err['msg']} (got {err.get('input')!r})"


def workspace() -> Path:
    """The workspace folder: $TUNELOOP_HOME, else .tuneloop/ in the current folder."""
    root = Path(os.environ.get("TUNELOOP_HOME") or Path.cwd() / ".tuneloop")
    root.mkdir(parents=True, exist_ok=True)
    return root


def save_yaml(data: dict, path: Path) -> None:
    """Write YAML atomically (temp file + rename)."""
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))
