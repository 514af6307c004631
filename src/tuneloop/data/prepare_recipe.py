"""The preparation recipe (`tuneloop data prepare --recipe prepare.yaml`): inputs, cleaning,
deduplication, anonymization, split and report settings, each key checked with its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    path: Path = Field(description="JSONL, CSV, TSV or Parquet file")
    mapping: dict[str, str] | None = Field(None, description="tuneloop field → column, e.g. "
                                           "{text: utterance, label: intent}; only these are kept")


class CleanSpec(_Strict):
    enabled: bool = True
    normalize: bool = Field(True, description="NFC, line ends, invisible characters, spacing")
    collapse_repeats: bool = Field(True, description="consecutive repeated lines kept once")
    min_chars: int = Field(2, ge=0, description="shortest prompt kept")
    max_chars: int = Field(100_000, gt=0, description="longest prompt + reply kept")
    max_repeated_fraction: float = Field(0.3, ge=0, le=1, description="drop rows where more "
                                         "than this share of lines repeat an earlier line")
    drop_empty_reply: bool = True
    drop_echo: bool = Field(True, description="drop replies that only repeat the prompt")


class NearSpec(_Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of character "
                             "5-grams at which two prompts are one example")
    num_perm: int = Field(256, ge=16, le=1024, description="MinHash permutations: more, less noise")


class SemanticSpec(_Strict):
    enabled: bool = False
    threshold: float = Field(0.95, gt=0, le=1, description="cosine of MiniLM embeddings")


class DedupSpec(_Strict):
    exact: bool = True
    near: NearSpec = NearSpec()
    semantic: SemanticSpec = SemanticSpec()


class AnonymizeSpec(_Strict):
    enabled: bool = True
    mode: Literal["placeholder", "fake", "reversible"] = "placeholder"
    entities: list[str] | None = Field(None, description="types to replace; default all")
    exclude: list[str] = Field(default_factory=list, description="types to leave in place")
    ner: bool = Field(True, description="names, organizations, places (model); off: patterns only")
    fields: list[str] | None = Field(None, description="top-level fields to scan; default all text")


class SplitSpec(_Strict):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    stratify: bool = Field(True, description="same label mix in every split (classification)")
    group_near_duplicates: bool = Field(True, description="near-duplicates that were kept "
                                        "(dedup off) land in one split")


class ReportSpec(_Strict):
    model: str | None = Field("smollm2-135m-instruct", description="tokenizer for the length "
                              "histogram (chat template included); null to skip")


class PrepareRecipe(_Strict):
    """A data preparation, as saved YAML. Only `task` and `inputs` are required."""

    name: str | None = Field(None, description="versions of one name form a lineage")
    task: Literal["classify", "extract", "chat"]
    inputs: list[InputSpec] = Field(default_factory=list)
    parent: str | None = Field(None, description="version this one derives from; default: the "
                               "latest of the same name")
    on_error: Literal["fail", "skip"] = Field("fail", description="a malformed row fails the "
                                              "run (default) or is skipped and reported")
    clean: CleanSpec = CleanSpec()
    dedup: DedupSpec = DedupSpec()
    anonymize: AnonymizeSpec = AnonymizeSpec()
    split: SplitSpec = SplitSpec()
    check_against: list[Path] = Field(default_factory=list, description="test files whose "
                                      "prompts must not appear in training data")
    drop_contaminated: bool = Field(True, description="remove training rows that match them")
    report: ReportSpec = ReportSpec()


def prepare_recipe_from_dict(raw: dict, source: str = "preparation recipe") -> PrepareRecipe:
    """Validate a mapping as a PrepareRecipe; errors name each key and how to fix it."""
    from tuneloop.project import validated

    return validated(PrepareRecipe, raw, source)


def load_prepare_recipe(path: str | Path) -> PrepareRecipe:
    """Parse a preparation recipe; relative paths are relative to the file."""
    from tuneloop.project import read_yaml_mapping

    path = Path(path)
    recipe = prepare_recipe_from_dict(read_yaml_mapping(path), str(path))
    base = path.resolve().parent
    inputs = [i.model_copy(update={"path": base / i.path}) for i in recipe.inputs]
    checks = [base / p for p in recipe.check_against]
    return recipe.model_copy(update={"inputs": inputs, "check_against": checks})
