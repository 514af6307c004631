"""`tuneloop data prepare`: a raw export in, a clean, anonymized, leak-free dataset version out.

    ingest → clean → exact dedup → near dedup → (semantic dedup) → anonymize → split → check

Ingest, cleaning and exact/near deduplication stream: rows go through one at a time and the kept
ones are spooled to disk, so memory holds only one 8-byte digest and one MinHash signature per
kept row. Anonymization streams over the spool in batches. The split needs only labels and
duplicate groups. Everything is written to a temporary folder that is renamed into place once
complete, and only then recorded in the registry: a failed run leaves no version behind.

The same pipeline runs from Python on a list of dicts or a `datasets.Dataset`:

    from tuneloop.data.curate import prepare
    version = prepare(rows, PrepareRecipe(task="classify"))
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from tuneloop.data import clean as cleaning
from tuneloop.data.dedup import NearDuplicates, exact_digest, semantic_duplicates
from tuneloop.core.formats import MIN_EXAMPLES, Problem, file_sha256, parse_row
from tuneloop.data.ingest import read_rows
from tuneloop.data.rows import prompt_text, reply_text
from tuneloop.data.prepare_recipe import PrepareRecipe
from tuneloop.data.split import read_spool, split_groups, write_splits
from tuneloop.errors import TuneloopError

EXAMPLES_PER_REASON = 5
SNIPPET = 300


@dataclass
class Step:
    """What one step did: rows in and out, why rows left, a few of each kind."""

    name: str
    settings: dict = field(default_factory=dict)
    rows_in: int = 0
    rows_out: int = 0
    changed: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def drop(self, reason: str, where: str, row: dict | None, **extra) -> None:
        self.removed[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < EXAMPLES_PER_REASON:
            self.examples.append({"reason": reason, "where": where,
                                  "text": _snippet(row), **extra})

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": dict(self.removed)}


def _snippet(row: dict | None) -> str:
    if row is None:
        return ""
    text = prompt_text(row)
    reply = reply_text(row)
    if reply:
        text += " → " + reply
    elif row.get("label") is not None:
        text += f" → [{row['label']}]"
    return text[:SNIPPET]


@dataclass
class Version:
    """A prepared dataset version: its folder, splits and the report of how it was made."""

    id: str
    folder: Path
    report: dict
    created: bool  # False: identical content was already recorded under this id

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.jsonl"


Source = tuple[str, Iterator[tuple[int, dict | None, Problem | None]]]


def sources_from_files(recipe: PrepareRecipe) -> list[Source]:
    if not recipe.inputs:
        raise TuneloopError("nothing to prepare: give input files (recipe `inputs:` or "
                            "`tuneloop data prepare FILE... --task KIND`)")
    return [(str(i.path), read_rows(i.path, i.mapping)) for i in recipe.inputs]


def source_from_rows(rows: Iterable[dict], name: str = "rows") -> Source:
    """Python rows (dicts, or a `datasets.Dataset`, which iterates as dicts) as a source."""
    return name, ((i + 1, dict(row), None) for i, row in enumerate(rows))


def prepare(data: Iterable[dict] | None = None, recipe: PrepareRecipe | None = None, *,
            workspace: Path | None = None, progress: Callable[[str], None] | None = None,
            lineage: dict | None = None, sources: list[Source] | None = None) -> Version:
    """Run the pipeline on `data` (rows), on `sources` ((name, read_rows(...)) pairs: an
    uploaded file under the name its owner knows) or on the recipe's input files; record the
    version. `lineage` (e.g. the teacher and prompts of synthetic rows) is kept in the report.
    """
    from tuneloop.project import workspace as default_workspace

    if recipe is None:
        raise TuneloopError("prepare needs a recipe (at least the task)")
    workspace = workspace or default_workspace()
    if sources is None:
        sources = [source_from_rows(data)] if data is not None else sources_from_files(recipe)
    root = workspace / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root))
    try:
        report = _run(sources, recipe, tmp, workspace, progress or (lambda _: None))
        if lineage:
            report["lineage"] = lineage
        return _record(report, recipe, tmp, root, workspace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(sources: list[Source], recipe: PrepareRecipe, tmp: Path, workspace: Path,
         progress: Callable[[str], None]) -> dict:
    """Every step into `tmp` (spool, anonymized rows, splits); the report of what each did."""
    spool = tmp / "spool.jsonl"
    stream = _Stream(sources, recipe)
    progress("reading, cleaning and deduplicating")
    stream.run(sources, spool)
    steps, kept = [stream.ingest, stream.clean, stream.exact, stream.near], stream.kept
    dropped = set()
    if recipe.dedup.semantic.enabled:
        progress("semantic deduplication (MiniLM)")
        semantic, dropped = _semantic_dedup(spool, kept, recipe)
        steps.append(semantic)
    final = tmp / "rows.jsonl"
    pii = _anonymize(spool, final, dropped, recipe, tmp, workspace, progress)
    if pii is not None:
        steps.append(pii.pop("step"))
    survivors = _survivors(kept, dropped)
    progress("splitting")
    splits, contamination = _split(final, survivors, kept, recipe, pii, tmp, workspace)
    if contamination:
        steps.append(contamination.pop("step"))
    return _report(recipe, stream.inputs, steps, splits, kept, pii, contamination)


class _Stream:
    """Ingest, clean, exact and near dedup in one pass, a row at a time, spooling the kept."""

    def __init__(self, sources: list[Source], recipe: PrepareRecipe):
        self.recipe = recipe
        self.ingest = Step("ingest", {"on_error": recipe.on_error,
                                      "inputs": [s[0] for s in sources]})
        self.clean = Step("clean", recipe.clean.model_dump())
        self.exact = Step("dedup_exact", {"enabled": recipe.dedup.exact})
        self.near = Step("dedup_near", recipe.dedup.near.model_dump())
        self.settings = cleaning.CleanSettings(**recipe.clean.model_dump(exclude={"enabled"}))
        self.near_index = (NearDuplicates(recipe.dedup.near.threshold, recipe.dedup.near.num_perm)
                           if recipe.dedup.near.enabled or recipe.split.group_near_duplicates
                           else None)
        self.digests: dict[bytes, int] = {}
        self.kept = _Kept()  # per spooled row: where it came from, its label and duplicate group
        self.problems: list[str] = []
        self.inputs: list[dict] = []

    def run(self, sources: list[Source], spool: Path) -> None:
        """Stream every source into the spool; raises on malformed rows unless skipping them."""
        with spool.open("w", encoding="utf-8") as out:
            for name, rows in sources:
                label = Path(name).name  # rows are named file:line in the report; inputs list paths
                count = 0
                for line, row, problem in rows:
                    count += 1
                    row = self._take(name, label, line, row, problem)
                    if row is not None:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.inputs.append({"name": name, "rows": count, "sha256": file_sha256(name)
                                    if Path(name).is_file() else None})
        if self.problems and self.recipe.on_error == "fail":
            total = sum(self.ingest.removed.values())
            raise TuneloopError(f"{total} malformed row(s); nothing was recorded:\n" +
                                "\n".join(self.problems) + "\nFix them, or set `on_error: skip` "
                                "to leave them out (they are listed in the report).")

    def _take(self, name: str, label: str, line: int, row, problem: Problem | None) -> dict | None:
        """One row through every step; the row to spool, or None when a step dropped it."""
        where = f"{label}:{line}"
        row = self._parse(name, where, line, row, problem)
        if row is not None:
            row = self._clean(where, row)
        return row if row is not None and self._dedup(where, label, line, row) else None

    def _parse(self, name: str, where: str, line: int, row, problem: Problem | None) -> dict | None:
        """The row validated for the task (None, and noted, when it is malformed)."""
        self.ingest.rows_in += 1
        if problem is None:
            example, _, found = parse_row(row, line, self.recipe.task)
            problem = found[0] if found else None
        if problem is not None:
            if len(self.problems) < 20:
                self.problems.append(f"  {name} line {problem.line}: {problem.code}: "
                                     f"{problem.message}")
            self.ingest.drop(problem.code, where, row if isinstance(row, dict) else None,
                             message=problem.message)
            return None
        self.ingest.rows_out += 1
        if "tags" in row and "text" not in row:  # BIO: prepared as text with fields
            row = {**{k: v for k, v in row.items() if k not in ("tokens", "tags")},
                   "text": example.messages[0]["content"], "fields": example.fields}
        return row

    def _clean(self, where: str, row: dict) -> dict | None:
        """The row cleaned, or None when cleaning drops it."""
        self.clean.rows_in += 1
        if self.recipe.clean.enabled:
            row, reason, changed = cleaning.clean_row(row, self.settings)
            self.clean.changed += changed
            if reason:
                self.clean.drop(reason, where, row)
                return None
        self.clean.rows_out += 1
        return row

    def _dedup(self, where: str, label: str, line: int, row: dict) -> bool:
        """Exact, then near deduplication; whether the row is kept (then added to `kept`)."""
        key = cleaning.match_key(prompt_text(row))
        digest = exact_digest(key)
        self.exact.rows_in += 1
        first = self.digests.get(digest)
        if first is not None and self.recipe.dedup.exact:
            self.exact.drop("duplicate", where, row, of=self.kept.where(first),
                            same_answer=exact_digest(_answer(row)) == self.kept.answers[first])
            self.kept.cluster(first)["exact"].append(where)
            return False
        self.exact.rows_out += 1
        self.near.rows_in += 1
        group = first
        if self.near_index is not None and first is None:
            sig = self.near_index.signature(key)
            match, similarity = self.near_index.match(key, sig)
            if match is not None and self.recipe.dedup.near.enabled:
                self.near.drop("near_duplicate", where, row, of=self.kept.where(match),
                               similarity=round(similarity, 3))
                self.kept.cluster(match)["near"].append((where, round(similarity, 3)))
                return False
            group = match
            self.near_index.add(len(self.kept), key, sig)
        self.near.rows_out += 1
        if first is None:
            self.digests[digest] = len(self.kept)
        self.kept.add(label, line, row.get("label"), exact_digest(_answer(row)),
                      self.kept.groups[group] if group is not None else len(self.kept))
        return True


def _semantic_dedup(spool: Path, kept: "_Kept", recipe: PrepareRecipe) -> tuple[Step, set[int]]:
    """The step and spool positions of rows whose prompt means another's (MiniLM)."""
    semantic = Step("dedup_semantic", recipe.dedup.semantic.model_dump(), rows_in=len(kept))
    dropped = set()
    rows = list(read_spool(spool))
    for index, (other, cosine) in semantic_duplicates(
            [prompt_text(r) for r in rows], recipe.dedup.semantic.threshold).items():
        semantic.drop("semantic_duplicate", kept.where(index), rows[index],
                      of=kept.where(other), similarity=cosine)
        kept.cluster(other)["near"].append((kept.where(index), cosine))
        dropped.add(index)
    semantic.rows_out = len(kept) - len(dropped)
    return semantic, dropped


def _survivors(kept: "_Kept", dropped: set[int]) -> list[int]:
    """Spool positions of the rows that are left; raises when too few are."""
    survivors = [i for i in range(len(kept)) if i not in dropped]
    if len(survivors) < MIN_EXAMPLES:
        raise TuneloopError(f"only {len(survivors)} example(s) left after cleaning and "
                            f"deduplication; at least {MIN_EXAMPLES} are needed. See which step "
                            "removed them with on_error: skip, or loosen its settings.")
    return survivors


def _split(final: Path, survivors: list[int], kept: "_Kept", recipe: PrepareRecipe,
           pii: dict | None, tmp: Path, workspace: Path) -> tuple[dict, dict | None]:
    """Assign duplicate groups to splits, check them against test files, write the splits."""
    assignment = split_groups([kept.groups[i] for i in survivors],
                              [kept.labels[i] for i in survivors] if recipe.task == "classify"
                              else None, recipe.split)
    contamination, drop_train = _contamination(final, survivors, assignment, recipe, kept)
    maps = pii.pop("maps") if pii else {}
    splits = write_splits(final, survivors, assignment, drop_train, tmp, maps, workspace)
    return splits, contamination


def _report(recipe: PrepareRecipe, inputs: list[dict], steps: list[Step], splits: dict,
            kept: "_Kept", pii: dict | None, contamination: dict | None) -> dict:
    """The version's report: inputs, recipe, steps, splits, largest duplicate clusters."""
    clusters = [{"kept": kept.where(i), "exact": c["exact"][:10], "near": c["near"][:10],
                 "size": 1 + len(c["exact"]) + len(c["near"])} for i, c in kept.clusters.items()]
    clusters.sort(key=lambda c: -c["size"])
    return {
        "name": recipe.name, "task": recipe.task, "inputs": inputs,
        "recipe": json.loads(recipe.model_dump_json()),
        "steps": [s.to_dict() for s in steps],
        "splits": splits, "clusters": {"count": len(clusters), "largest": clusters[:50]},
        "pii": pii, "contamination": contamination,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class _Kept:
    """Per spooled row, compactly: source and line, label, answer digest, duplicate group;
    clusters only for rows that have duplicates. About 100 bytes a row."""

    def __init__(self):
        self.names: list[str] = []
        self.sources = array("H")
        self.lines = array("q")
        self.labels: list = []
        self.answers: list[bytes] = []
        self.groups = array("q")
        self.clusters: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.lines)

    def add(self, name: str, line: int, label, answer: bytes, group: int) -> None:
        if not self.names or self.names[-1] != name:
            self.names.append(name)
        self.sources.append(len(self.names) - 1)
        self.lines.append(line)
        self.labels.append(sys.intern(label) if isinstance(label, str) else label)
        self.answers.append(answer)
        self.groups.append(group)

    def where(self, i: int) -> str:
        return f"{self.names[self.sources[i]]}:{self.lines[i]}"

    def cluster(self, i: int) -> dict:
        return self.clusters.setdefault(i, {"exact": [], "near": []})


def _answer(row: dict) -> str:
    if row.get("label") is not None:
        return str(row["label"])
    if row.get("fields") is not None:
        return json.dumps(row["fields"], sort_keys=True, ensure_ascii=False)
    return reply_text(row) or ""


def _anonymize(spool: Path, final: Path, dropped: set[int], recipe: PrepareRecipe, tmp: Path,
               workspace: Path, progress: Callable[[str], None]) -> dict | None:
    """Stream the spool through the detector in batches; None when anonymization is off."""
    spec = recipe.anonymize
    if not spec.enabled:
        os.replace(spool, final)
        return None
    from tuneloop.data import pii

    progress("finding and replacing personal data")
    entities = [e for e in (spec.entities or pii.ENTITY_TYPES) if e not in spec.exclude]
    detector = pii.Detector(entities, ner=spec.ner)
    step = Step("anonymize", spec.model_dump())
    by_type: Counter = Counter()
    maps: dict[int, dict[str, str]] = {}
    batch: list[tuple[int, dict]] = []
    with final.open("w", encoding="utf-8") as out:
        def flush():
            rows, findings, row_maps = pii.anonymize_rows([r for _, r in batch], detector,
                                                          spec.mode, spec.fields)
            for (index, _), row, found, mapping in zip(batch, rows, findings, row_maps):
                step.rows_in += 1
                step.rows_out += 1
                if found:
                    step.changed += 1
                    by_type.update(f.type for f in found)
                    if len(step.examples) < 20:  # anonymized text only: the report is shareable
                        step.examples.append({"reason": "replaced", "where": str(index + 1),
                                              "types": sorted({f.type for f in found}),
                                              "text": _snippet(row)})
                if mapping:
                    maps[index] = mapping
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            batch.clear()

        for index, row in enumerate(read_spool(spool)):
            if index in dropped:
                out.write("null\n")  # keeps positions; never written to a split
                continue
            batch.append((index, row))
            if len(batch) == 256:
                flush()
        if batch:
            flush()
    return {"step": step, "maps": maps, "by_type": dict(by_type.most_common()), "rows_with_pii": step.changed,
            "mode": spec.mode, "entities": entities}


def _contamination(final: Path, survivors: list[int], assignment: list[str],
                    recipe: PrepareRecipe, kept: "_Kept") -> tuple[dict | None, set[int]]:
    """Training rows whose prompt exactly or nearly matches a row of a given test file."""
    if not recipe.check_against:
        return None, set()
    step = Step("contamination", {"files": [str(p) for p in recipe.check_against],
                                  "threshold": recipe.dedup.near.threshold,
                                  "drop": recipe.drop_contaminated})
    index = NearDuplicates(recipe.dedup.near.threshold, recipe.dedup.near.num_perm)
    digests: dict[bytes, int] = {}
    rows = {}
    position = {s: n for n, s in enumerate(survivors)}
    for i, row in enumerate(read_spool(final)):
        n = position.get(i)
        if n is None or assignment[n] != "train":
            continue
        key = cleaning.match_key(prompt_text(row))
        digests.setdefault(exact_digest(key), i)
        index.add(i, key)
        rows[i] = row
    hits: dict[int, dict] = {}
    per_file = {}
    for path in recipe.check_against:
        found = 0
        for line, row, problem in read_rows(path):
            if problem is not None or not isinstance(row, dict):
                continue
            key = cleaning.match_key(prompt_text(row))
            match = digests.get(exact_digest(key))
            similarity = 1.0
            if match is None:
                match, similarity = index.match(key)
            if match is not None:
                found += 1
                hits.setdefault(match, {"test": f"{Path(path).name}:{line}",
                                        "similarity": round(similarity, 3)})
        per_file[str(path)] = found
    step.rows_in = sum(1 for a in assignment if a == "train")
    for i, hit in hits.items():
        step.drop("matches_test_row", kept.where(i), rows[i], **hit)
    drop = set(hits) if recipe.drop_contaminated else set()
    step.rows_out = step.rows_in - len(drop)
    return {"step": step, "test_rows_matched": per_file, "train_rows_matching": len(hits),
            "dropped": len(drop)}, drop


def _record(report: dict, recipe: PrepareRecipe, tmp: Path, root: Path, workspace: Path) -> Version:
    """Rename the finished folder into place, then record it in one registry transaction."""
    from tuneloop.data.report import token_lengths
    from tuneloop.store import Registry

    digest = hashlib.sha256(json.dumps({s: v["sha256"] for s, v in report["splits"].items()},
                                       sort_keys=True).encode()).hexdigest()
    version_id = "dv-" + digest[:12]
    registry = Registry.open(workspace)
    existing = registry.get_version(version_id)
    if existing is not None:
        return Version(version_id, Path(existing.folder), existing.report, created=False)
    report["id"], report["sha256"] = version_id, digest
    report["parent"] = recipe.parent or registry.latest_version_id(recipe.name)
    if recipe.parent and registry.get_version(recipe.parent) is None:
        raise TuneloopError(f"parent version {recipe.parent} is not in the registry; "
                            "`tuneloop data versions` lists them")
    if recipe.report.model:
        report["token_lengths"] = token_lengths(
            [tmp / f"{s}.jsonl" for s in report["splits"]], recipe.task, recipe.report.model)
    (tmp / "spool.jsonl").unlink(missing_ok=True)
    (tmp / "rows.jsonl").unlink(missing_ok=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str),
                                     encoding="utf-8")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(report["recipe"], sort_keys=False),
                                     encoding="utf-8")
    folder = root / version_id
    if folder.exists():  # left by a run whose registry write failed: same content, replace it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    try:
        registry.add_version(version_id, report, folder)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Version(version_id, folder, report, created=True)


def registry():
    """The registry of the current workspace."""
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    return Registry.open(workspace())
