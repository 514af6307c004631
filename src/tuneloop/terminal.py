"""What every command module shares: the consoles, the --json option, the printers, the
progress bar and the error handler. The command modules import this, never cli.py (which only
assembles the app from them)."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tuneloop.errors import TuneloopError

# Wide tables stay readable when output goes to a file or a pipe (rich assumes 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")



def run(app) -> None:
    """Run a Typer app as the console script: a user mistake (TuneloopError) is one red line and
    exit status 1, never a traceback."""
    # Deprecation chatter from dependencies (peft asks transformers about gradient
    # checkpointing by its old name) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except TuneloopError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def training_progress(enabled: bool = True):
    """A progress bar with loss, tokens/s and ETA; yields the callback `train` expects."""
    if not enabled:
        yield None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as bar:
        task = None  # drawn at the first step: the data is validated and loaded before it

        def update(step, steps, loss, tps):
            nonlocal task
            if task is None:
                task = bar.add_task("training", total=steps, loss=loss, tps=tps)
            bar.update(task, total=steps, completed=step, loss=loss, tps=tps)

        yield update


def print_metrics(result: dict) -> None:
    keys = ["accuracy", "macro_f1", "field_f1", "json_valid_rate", "rouge_l", "bleu",
            "exact_match", "numeric_match", "mae", "perplexity", "train_tokens",
            "train_tokens_per_s", "final_val_loss", "final_val_kl", "peak_rss_mb", "wall_s"]
    ci = (result.get("test") or result.get("metrics") or {}).get("ci95")
    table = Table("metric", "value")
    for k in keys:
        if result.get(k) is not None:
            v = result[k]
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
            if ci and ci["metric"] == k:
                table.add_row("  95% interval", f"{ci['low']:.4g} – {ci['high']:.4g}")
    out.print(table)
    check = result.get("forgetting")
    if check:
        word = "[red]FLAGGED[/]" if check["flagged"] else "[green]ok[/]"
        out.print(f"forgetting check {word}: general accuracy {check['base']['accuracy']:.2f} → "
                  f"{check['fine_tuned']['accuracy']:.2f}, reference loss "
                  f"{check['base']['loss']:.3f} → {check['fine_tuned']['loss']:.3f}"
                  + "".join(f"\n  {r}" for r in check["reasons"]))


def print_scoreboard(task: str, rows: dict[str, dict], title: str = "scoreboard") -> None:
    """One row per model/strategy: the task's metrics, latency, cost and prompt size."""
    from tuneloop import tasks

    metrics = tasks.module(task).COLUMNS
    columns = {**{m: m for m in metrics}, "latency_ms_per_request": "ms/request",
               "cost_per_1k_requests": "$/1k req", "prompt_tokens": "prompt tokens",
               "shots": "shots"}
    table = Table("model", *columns.values(), title=title)
    for name, m in rows.items():
        table.add_row(name, *[cell(m.get(c)) for c in columns])
    out.print(table)


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if value >= 100 else f"{value:.4f}" if value < 0.01 else f"{value:.3f}"
    return str(value)
