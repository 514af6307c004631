"""`tuneloop synth RECIPE.yaml` (cli.py puts it on `tuneloop`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tuneloop.terminal import JSON_OPT, err, out, print_json

app = typer.Typer()


@app.command("synth")
def synth(
    recipe: Path = typer.Argument(..., help="a synth recipe (.yaml)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Let a teacher model label, answer, expand or rank data; filter; record a dataset version.

    Example: tuneloop synth examples/banking77/synth.yaml
    Requests are cached in the workspace: run it again after an interruption and only the
    missing answers are asked for.
    """
    from tuneloop.synth.recipe import load_synth_recipe
    from tuneloop.synth.run import synthesize

    version = synthesize(load_synth_recipe(recipe), progress=lambda m: err.print(f"[dim]{m}…[/]"))
    lineage = version.report["lineage"]
    if as_json:
        print_json({"id": version.id, "created": version.created, "folder": str(version.folder),
                     "splits": version.report["splits"], "lineage": lineage})
        return
    usage = lineage["usage"]
    terms = lineage["teacher"]["terms"] or "not given"
    out.print(f"teacher {lineage['teacher']['id']} (terms: {terms}): "
              f"{usage['requests']} request(s) sent, {usage['cached']} from the cache, "
              f"{usage['failed']} failed; {usage['prompt_tokens']} prompt + "
              f"{usage['completion_tokens']} completion tokens", highlight=False)
    table = Table("kept", "dropped: reason", title=f"{lineage['offered']} input(s) offered")
    dropped = ", ".join(f"{k} {v}" for k, v in lineage["dropped"].items()) or "–"
    table.add_row(str(lineage["synthetic_rows"]), dropped)
    out.print(table)
    splits = ", ".join(f"{k} {v['rows']}" for k, v in version.report["splits"].items())
    note = "" if version.created else " (identical content: already recorded)"
    out.print(f"{version.id}{note}: {splits} rows in {version.folder}", highlight=False)
