"""Data curation commands: `data prepare`, `data versions`, `data report`, `data anonymize`,
`data pii-scan`, `data reidentify`, `data pii-model`, `data validate`: the `tuneloop data` group
(cli.py adds it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from tuneloop.errors import TuneloopError
from tuneloop.terminal import JSON_OPT, err, out, print_json
from tuneloop.core.files import atomic_write

app = typer.Typer(no_args_is_help=True, help="Check, prepare, anonymize and report on data.")

FIELDS_OPT = typer.Option(None, "--fields", help="Comma-separated top-level fields to scan "
                          "(default: every string field except labels and roles).")
ENTITIES_OPT = typer.Option(None, "--entities", help="Comma-separated types (default: all; see "
                            "`tuneloop data pii-model`).")
NO_NER_OPT = typer.Option(False, "--no-ner", help="Patterns only (e-mail, phone, card, IBAN, IP, "
                          "URL, national IDs): no names, places or organizations, but ~10x faster.")


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _train_recognizer():
    """The name recognizer's folder; the first use on a machine trains it, with a progress bar
    and the time it will take (about seven minutes on two cores)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    from tuneloop.data.pii_model import NER_EPOCHS, ensure_ner_model, ner_model_ready

    if ner_model_ready():
        return ensure_ner_model()
    err.print("training the name recognizer once for this machine (about seven minutes on "
              "two cores; cached for every later use)")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.2f}"), TimeRemainingColumn()]
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("epochs", total=NER_EPOCHS, loss=0.0)
        return ensure_ner_model(on_epoch=lambda e, n, loss: bar.update(
            task, completed=e, total=n, loss=loss))


def _detector(entities: str | None, no_ner: bool):
    from tuneloop.data import pii

    model = None if no_ner else _train_recognizer()
    return pii.Detector(_split(entities), ner=not no_ner, model=model)


@app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Argument(..., help="a preparation recipe (.yaml), or data files "
                                        "(JSONL, CSV, TSV, Parquet) with --task"),
    task: Optional[str] = typer.Option(None, help="classify | extract | chat (with files)"),
    name: Optional[str] = typer.Option(None, help="lineage name: versions of one name chain"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip malformed rows instead of "
                                  "failing (they are listed in the report)"),
    no_anonymize: bool = typer.Option(False, "--no-anonymize", help="keep personal data as is"),
    check: list[Path] = typer.Option([], "--check", help="a test file whose prompts must not "
                                     "be in training (repeatable)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Clean, deduplicate, anonymize and split data into a new dataset version.

    Example: tuneloop data prepare examples/banking77/prepare.yaml
             tuneloop data prepare export.csv --task classify --name support
    """
    from tuneloop.data.curate import prepare
    from tuneloop.data.prepare_recipe import PrepareRecipe, load_prepare_recipe

    if len(inputs) == 1 and inputs[0].suffix in (".yaml", ".yml"):
        if task:
            raise TuneloopError("--task comes from the recipe; give it there")
        recipe = load_prepare_recipe(inputs[0])
    else:
        if not task:
            raise TuneloopError("give --task classify|extract|chat with data files (or a "
                                "recipe .yaml)")
        try:
            recipe = PrepareRecipe(task=task, name=name, inputs=[{"path": p} for p in inputs])
        except ValueError as exc:
            raise TuneloopError(f"--task {task!r}: use classify, extract or chat") from exc
    update = {}
    if name:
        update["name"] = name
    if skip_bad:
        update["on_error"] = "skip"
    if check:
        update["check_against"] = list(recipe.check_against) + check
    if no_anonymize:
        update["anonymize"] = recipe.anonymize.model_copy(update={"enabled": False})
    recipe = recipe.model_copy(update=update)
    if recipe.anonymize.enabled and recipe.anonymize.ner:
        _train_recognizer()  # (before the pipeline starts, with its own progress bar)
    version = prepare(recipe=recipe, progress=lambda m: err.print(f"[dim]{m}…[/]"))
    report = version.report
    if as_json:
        print_json({"id": version.id, "created": version.created, "folder": str(version.folder),
                     "splits": report["splits"],
                     "steps": {s["name"]: {"in": s["rows_in"], "out": s["rows_out"],
                                           "removed": s["removed"]} for s in report["steps"]}})
        return
    table = Table("step", "in", "out", "changed", "removed", title=f"dataset {version.id}")
    for s in report["steps"]:
        table.add_row(s["name"], str(s["rows_in"]), str(s["rows_out"]), str(s["changed"]),
                      ", ".join(f"{k} {v}" for k, v in s["removed"].items()) or "–")
    out.print(table)
    splits = ", ".join(f"{k} {v['rows']}" for k, v in report["splits"].items())
    note = "" if version.created else " (identical content: already recorded)"
    out.print(f"{version.id}{note}: {splits} rows in {version.folder}", highlight=False)
    out.print(f"report: tuneloop data report {version.id}", highlight=False)


@app.command("versions")
def data_versions(as_json: bool = JSON_OPT) -> None:
    """Prepared dataset versions, newest first, with their parents."""
    from tuneloop.data.curate import registry

    versions = registry().list_versions()
    if as_json:
        print_json([{"id": v.id, "name": v.name, "parent": v.parent, "task": v.task,
                      "splits": v.splits, "folder": v.folder, "created": v.created}
                     for v in versions])
        return
    table = Table("id", "name", "task", "parent", "rows", "created")
    for v in versions:
        rows = ", ".join(f"{k} {i['rows']}" for k, i in v.report["splits"].items())
        table.add_row(v.id, v.name or "–", v.task, v.parent or "–", rows, f"{v.created:%Y-%m-%d %H:%M}")
    out.print(table)


@app.command("report")
def data_report(
    version: str = typer.Argument(..., help="dataset version id (see `tuneloop data versions`)"),
    html_out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: "
                                            "report.html in the version's folder)"),
    as_json: bool = JSON_OPT,
) -> None:
    """What preparing a version did: removals per step with examples, labels, token lengths,
    personal data by type, duplicate clusters. An HTML page, or --json."""
    from tuneloop.data.curate import registry
    from tuneloop.data.report import render_html

    found = registry().get_version(version)
    if found is None:
        raise TuneloopError(f"no dataset version {version!r}; `tuneloop data versions` lists them")
    if as_json:
        print_json(found.report)
        return
    target = html_out or Path(found.folder) / "report.html"
    atomic_write(target, render_html(found.report))
    out.print(f"wrote {target}", highlight=False)


@app.command("anonymize")
def data_anonymize(
    src: Path = typer.Argument(..., help="data file (JSONL, CSV, TSV, Parquet)"),
    dst: Path = typer.Argument(..., help="anonymized JSONL to write"),
    fields: Optional[str] = FIELDS_OPT,
    mode: str = typer.Option("placeholder", help="placeholder (<PERSON_1>) | fake (realistic "
                             "stand-ins) | reversible (placeholders + encrypted map)"),
    entities: Optional[str] = ENTITIES_OPT,
    no_ner: bool = NO_NER_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Replace personal data in every row's text fields, consistently within a row.

    Example: tuneloop data anonymize feedback.jsonl feedback.anon.jsonl --fields text
    """
    from tuneloop.data import pii
    from tuneloop.project import workspace

    if mode not in pii.MODES:
        raise TuneloopError(f"--mode {mode!r}: use one of {', '.join(pii.MODES)}")
    result = pii.anonymize_file(src, dst, _detector(entities, no_ner), mode, _split(fields),
                                workspace())
    if as_json:
        print_json(result)
        return
    kinds = ", ".join(f"{k} {v}" for k, v in result["by_type"].items()) or "none found"
    out.print(f"{dst}: {result['rows']} rows, {result['rows_with_pii']} with personal data "
              f"({kinds})" + (f"; map: {result['map']}" if result["map"] else ""), highlight=False)


@app.command("pii-scan")
def data_pii_scan(
    file: Path = typer.Argument(..., help="data file to scan"),
    fields: Optional[str] = FIELDS_OPT,
    entities: Optional[str] = ENTITIES_OPT,
    no_ner: bool = NO_NER_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Report personal data by type and line without changing anything; exits 1 if any is found."""
    from tuneloop.data import pii

    result = pii.scan_file(file, _detector(entities, no_ner), _split(fields))
    if as_json:
        print_json(result)
    else:
        table = Table("line", "field", "type", "span", "score", title=f"personal data in {file}")
        for f in result["findings"][:50]:
            table.add_row(str(f["line"]), f["field"], f["type"], f"{f['start']}-{f['end']}",
                          f"{f['score']:.2f}")
        if result["findings"]:
            out.print(table)
        kinds = ", ".join(f"{k} {v}" for k, v in result["by_type"].items()) or "none"
        out.print(f"{file}: {result['rows']} rows, {result['rows_with_pii']} with personal data "
                  f"({kinds})", highlight=False)
    raise typer.Exit(1 if result["rows_with_pii"] else 0)


@app.command("reidentify")
def data_reidentify(
    src: Path = typer.Argument(..., help="a file anonymized in reversible mode"),
    dst: Path = typer.Argument(..., help="JSONL to write with the originals back"),
    map_file: Optional[Path] = typer.Option(None, "--map", help="its encrypted map (default: "
                                            "SRC.map.enc)"),
) -> None:
    """Put the originals back into a reversibly anonymized file (needs this workspace's key)."""
    from tuneloop.data import pii
    from tuneloop.project import workspace

    map_file = map_file or pii.map_path(src)
    if not map_file.is_file():
        raise TuneloopError(f"{map_file}: no such map; only reversible mode writes one")
    rows = pii.reidentify_file(src, dst, map_file, workspace())
    out.print(f"{dst}: {rows} rows", highlight=False)


@app.command("pii-model")
def data_pii_model(as_json: bool = JSON_OPT) -> None:
    """Train (once) and show the personal-data recognizer and the types it handles."""
    from tuneloop.data import pii, pii_model

    path = _train_recognizer()
    info = {"model": str(path), "base_model": str(pii_model.base_folder()),
            "model_types": pii_model.NER_TYPES,
            "pattern_types": pii.PATTERN_TYPES, "training_data": str(pii_model.NER_TRAIN)}
    if as_json:
        print_json(info)
        return
    out.print(json.dumps(info, indent=2))


@app.command("validate")
def data_validate(
    file: Path = typer.Argument(..., help="JSONL file to check"),
    task: Optional[str] = typer.Option(None, help="classify | extract | chat (checks labels/fields)"),
    model: str = typer.Option("smollm2-135m-instruct", help="base model whose context limits rows"),
    as_json: bool = JSON_OPT,
) -> None:
    """Check every line of a data file and list every problem with its line number.

    Example: tuneloop data validate examples/banking77/train.jsonl --task classify
    """
    from tuneloop.data.validate import validate

    report = validate(file, task=task, model=model)
    if as_json:
        print_json(report.to_dict())
    else:
        if report.problems:
            table = Table("line", "code", "message", title=f"problems in {file}")
            for p in report.problems[:50]:
                table.add_row(str(p.line), p.code, p.message)
            out.print(table)
            hidden = sum(report.counts.values()) - min(50, len(report.problems))
            if hidden:
                out.print(f"... and {hidden} more (use --json for the full list)")
        if report.warnings:
            table = Table("line", "code", "message", title=f"warnings in {file}")
            for w in report.warnings[:50]:
                table.add_row(str(w.line), w.code, w.message)
            out.print(table)
        verdict = "[green]valid[/]" if report.ok else "[red]invalid[/]"
        formats = ", ".join(f"{n} {k}" for k, n in report.formats.items()) or "none"
        out.print(f"{file}: {verdict} — {report.rows} rows, {report.valid} valid ({formats})")
    raise typer.Exit(0 if report.ok else 1)
