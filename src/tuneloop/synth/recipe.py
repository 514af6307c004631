"""The synth recipe (`tuneloop synth RECIPE.yaml`): the teacher, the mode, the inputs and
seeds, the filters, and where the result goes. Relative paths are relative to the YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuneloop import tasks
from tuneloop.data.prepare_recipe import AnonymizeSpec, InputSpec, ReportSpec, SplitSpec
from tuneloop.synth.teacher import EndpointTeacher, LocalTeacher, Teacher


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible API, "
                                 "e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="the endpoint's model name; without endpoint: "
                              "a catalog model or folder run locally")
    run: str | None = Field(None, description="a finished run whose model is the teacher")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable with the key")
    terms: str | None = Field(None, description="licence/terms of the teacher's outputs, recorded "
                              "in the lineage and checked by `train` (local: the catalog's)")
    concurrency: int = Field(8, ge=1, le=256, description="requests in flight (endpoint)")
    max_retries: int = Field(5, ge=0, le=20, description="retries with backoff per request")
    timeout_s: float = Field(120.0, gt=0)
    max_tokens: int = Field(256, gt=0, description="longest reply")

    @model_validator(mode="after")
    def _one_source(self):
        if self.run and (self.endpoint or self.model):
            raise ValueError("give either run, or endpoint + model, or a local model")
        if self.endpoint and not self.model:
            raise ValueError("an endpoint needs the model name to ask for (model: ...)")
        if not (self.run or self.model):
            raise ValueError("name the teacher: run: RUN_ID, or endpoint: URL + model: NAME")
        return self


class ConsistencySpec(_Strict):
    samples: int = Field(1, ge=1, le=16, description="answers sampled per input (label mode)")
    temperature: float = Field(0.8, gt=0, le=2)
    min_agreement: float = Field(0.6, gt=0, le=1, description="share of samples that must give "
                                 "the majority answer")


class JudgeSpec(_Strict):
    enabled: bool = False
    teacher: TeacherSpec | None = Field(None, description="default: the teacher itself")
    min_score: int = Field(4, ge=1, le=5, description="keep answers scored at least this")


class ExpandSpec(_Strict):
    requests: int = Field(20, ge=1, description="generation requests (each writes `per_request`)")
    per_request: int = Field(5, ge=1, le=50, description="new inputs asked for per request")
    shots: int = Field(5, ge=1, le=50, description="seed examples shown per request")
    temperature: float = Field(1.0, gt=0, le=2)
    verify: bool = Field(True, description="classify: keep only inputs the teacher labels as "
                         "the label they were written for")


class SynthRecipe(_Strict):
    """A synthetic-data generation, as saved YAML."""

    name: str | None = Field(None, description="versions of one name form a lineage")
    task: Literal["classify", "extract", "chat"]
    mode: Literal["label", "answer", "expand", "preferences"]
    teacher: TeacherSpec
    inputs: list[InputSpec] = Field(default_factory=list, description="unlabeled inputs")
    seeds: list[InputSpec] = Field(default_factory=list, description="labelled examples: the "
                                   "label set / fields, and the examples `expand` imitates")
    labels: list[str] | None = Field(None, description="classify: the label set (default: from "
                                     "seeds, else the teacher run's)")
    fields: list[str] | None = Field(None, description="extract: the field names")
    instruction: str | None = Field(None, description="system prompt replacing the task's")
    include_seeds: bool = Field(False, description="the version also holds the seed rows")
    consistency: ConsistencySpec = ConsistencySpec()
    judge: JudgeSpec = JudgeSpec()
    expand: ExpandSpec = ExpandSpec()
    dedup_against: list[Path] = Field(default_factory=list, description="existing data: rows "
                                      "that (nearly) repeat it are dropped")
    check_against: list[Path] = Field(default_factory=list, description="test sets: rows that "
                                      "(nearly) repeat them are dropped")
    near_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard of 5-grams: a near "
                                  "duplicate")
    seed: int = 0
    split: SplitSpec = SplitSpec(validation=0.0, test=0.0)
    anonymize: AnonymizeSpec = AnonymizeSpec(enabled=False)
    report: ReportSpec = ReportSpec()

    @model_validator(mode="after")
    def _fits(self):
        if self.mode not in tasks.module(self.task).SYNTH_MODES:
            raise ValueError(_unsupported(self.mode, self.task))
        if self.mode == "expand" and not self.seeds:
            raise ValueError("mode expand imitates seed examples: add seeds: [{path: ...}]")
        if self.mode != "expand" and not self.inputs:
            raise ValueError(f"mode {self.mode} needs inputs: [{{path: ...}}]")
        return self


def _unsupported(mode: str, task: str) -> str:
    """Why a task's module refuses a synth mode, naming the tasks (`SYNTH_MODES`) that take it."""
    takers = " and ".join(kind for kind, m in tasks.TASKS.items() if mode in m.SYNTH_MODES)
    if mode == "label":
        return (f"mode label is for {takers}; use mode {tasks.module(task).SYNTH_MODES[0]} "
                f"for {task}")
    if mode in ("answer", "preferences"):
        return f"mode {mode} writes replies: use it with task {takers}"
    return f"mode {mode} is for task {takers}, not {task}"


def load_synth_recipe(path: str | Path) -> SynthRecipe:
    """Parse a synth recipe; relative paths are relative to the file."""
    from tuneloop.project import read_yaml_mapping, validated

    path = Path(path)
    recipe = validated(SynthRecipe, read_yaml_mapping(path), str(path))
    base = path.resolve().parent
    return recipe.model_copy(update={
        "inputs": [i.model_copy(update={"path": base / i.path}) for i in recipe.inputs],
        "seeds": [i.model_copy(update={"path": base / i.path}) for i in recipe.seeds],
        "dedup_against": [base / p for p in recipe.dedup_against],
        "check_against": [base / p for p in recipe.check_against]})


def make_teacher(spec: TeacherSpec, registry) -> Teacher:
    if spec.endpoint:
        return EndpointTeacher(spec.endpoint, spec.model, spec.api_key_env, spec.concurrency,
                               spec.max_retries, spec.timeout_s, spec.terms)
    teacher = LocalTeacher(spec.run or spec.model, registry)
    if spec.terms:
        teacher.terms = spec.terms
    return teacher
