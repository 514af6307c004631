"""The `tuneloop` command, assembled: the app, its groups, and the commands of each stage's
module (train/, serve/, data/, synth/ commands.py), which import their shared pieces from
terminal.py. Each command parses, calls one library function, prints.

User mistakes raise TuneloopError: printed as one clear message, exit status 1, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Column, Table

from tuneloop.data import commands as data_commands
from tuneloop.errors import TuneloopError
from tuneloop.serve import commands as serve_commands
from tuneloop.synth import commands as synth_commands
from tuneloop.terminal import (JSON_OPT, cell, err, out, print_json, print_metrics, print_scoreboard,
                               run)
from tuneloop.train import commands as train_commands

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Fine-tune a small open model on your task, and prove it was worth it.")
runs_app = typer.Typer(no_args_is_help=True, help="Training runs in the registry.")
models_app = typer.Typer(no_args_is_help=True, help="Base models tuneloop knows.")
app.add_typer(data_commands.app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")


def main() -> None:
    """Console-script entry point."""
    run(app)


eval_app = typer.Typer(help="Score models, and compare them on the same test rows.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="base model (catalog id, folder) "
                                        "or run id"),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL test data"),
    task: Optional[str] = typer.Option(None, help="classify | extract | chat (base models)"),
    labels_from: Optional[Path] = typer.Option(None, help="training file giving the label set"),
    as_json: bool = JSON_OPT,
) -> None:
    """Score a base model (zero-shot) or a run's adapter on a data file.

    Example: tuneloop eval --model smollm2-135m-instruct --data test.jsonl --task classify
             tuneloop eval compare RUN_A RUN_B     (same test rows, intervals, paired tests)
    """
    if ctx.invoked_subcommand:
        return
    if not model or not data:
        raise TuneloopError("give --model and --data (or `tuneloop eval compare A B`)")
    from tuneloop.evaluate import evaluate

    result = evaluate(model, data, task=task, labels_from=labels_from)
    if as_json:
        print_json(result)
        return
    print_metrics(result)


@eval_app.command("compare")
def eval_compare(
    refs: list[str] = typer.Argument(..., help="runs or evaluation ids; the first is the "
                                     "reference the others are compared with"),
    baselines: bool = typer.Option(True, help="add the first run's prompting baselines"),
    html_out: Optional[Path] = typer.Option(None, "--out", help="write the HTML report here"),
    as_json: bool = JSON_OPT,
) -> None:
    """Compare models on the same test rows: metric with 95% bootstrap intervals, paired
    difference and p-value (McNemar too for labels), the rows fixed and broken.

    Example: tuneloop eval compare run-20261123-ab12cd run-20261123-ef34gh --out cmp.html
    """
    from tuneloop.evaluate import compare as cmp
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    registry = Registry.open(workspace())
    entries = [cmp.load(ref, registry) for ref in refs]
    if baselines:
        known = {e.evaluation for e in entries}
        entries += [cmp.load(ev, registry) for ev in cmp.gate_baselines(entries[0], registry)
                    if ev not in known]
    result = cmp.compare(entries)
    if html_out:
        cmp.write_html(result, html_out)
    if as_json:
        print_json(result)
        return
    metric = result["metric"]
    table = Table("model", metric, "95% interval", "vs first", "p", "fixed", "broken",
                  title=f"{result['rows']} shared test rows")
    pairs = {p["model"]: p for p in result["pairs"]}
    for m in result["models"]:
        p = pairs.get(m["name"])
        table.add_row(m["name"], f"{m[metric]:.3f}", f"{m['low']:.3f}–{m['high']:.3f}",
                      f"{p['difference']:+.3f}" if p else "–",
                      cmp.fmt_p(p["p_value"]).lstrip("= ") if p else "–",
                      str(p["fixed"]) if p else "–",
                      str(p["broken"]) if p else "–")
    out.print(table)
    if html_out:
        out.print(f"report: {html_out}", highlight=False)


@eval_app.command("judge")
def eval_judge(
    refs: list[str] = typer.Argument(..., help="one run/evaluation (scores 1-5) or two (which "
                                     "answers better, asked in both orders)"),
    judge_run: Optional[str] = typer.Option(None, "--judge-run", help="a finished run as judge"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="a catalog model, or "
                                              "the endpoint's model name"),
    judge_endpoint: Optional[str] = typer.Option(None, "--judge-endpoint", help="base URL of an "
                                                 "OpenAI-compatible API"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="variable holding the endpoint's key"),
    rubric: Optional[str] = typer.Option(None, help="what makes an answer good"),
    human: Optional[Path] = typer.Option(None, help="JSONL {line, score}: human scores the "
                                         "judge is checked against"),
    limit: Optional[int] = typer.Option(None, help="judge only the first N test rows"),
    reference: bool = typer.Option(True, help="show the judge the reference answer"),
    as_json: bool = JSON_OPT,
) -> None:
    """Let an LLM judge grade a model's answers (pointwise) or two models' (pairwise).

    Example: tuneloop eval judge RUN --judge-endpoint http://127.0.0.1:8080/v1 --judge-model m
             tuneloop eval judge RUN_A RUN_B --judge-model smollm2-135m-instruct
    """
    from tuneloop.evaluate.judge import RUBRIC, run_judge
    from tuneloop.project import workspace

    spec = {"run": judge_run, "model": judge_model, "endpoint": judge_endpoint,
            "api_key_env": api_key_env}
    try:
        from tuneloop.synth.recipe import TeacherSpec

        TeacherSpec.model_validate(spec)
    except ValueError:
        raise TuneloopError("name the judge: --judge-run RUN, --judge-model MODEL, or "
                            "--judge-endpoint URL --judge-model NAME") from None
    result = run_judge(refs, spec, workspace(), rubric or RUBRIC, human, limit, reference)
    if as_json:
        print_json({k: v for k, v in result.items() if k != "judgements"})
        return
    judge = f"judge {result['judge']['id']}, prompt {result['prompt']['id']}"
    if result["mode"] == "pointwise":
        agree = result["agreement_with_metric"]
        out.print(f"{result['model']}: mean score {result['mean_score']:.2f} "
                  f"({result['low']:.2f}–{result['high']:.2f}) on {result['rows']} rows "
                  f"({result['unparsed']} unparsed); {judge}", highlight=False)
        out.print(f"agreement with the task metric: {agree['agreement']}" +
                  (f", with humans: {result['agreement_with_humans']}"
                   if "agreement_with_humans" in result else ""), highlight=False)
    else:
        out.print(f"{result['second']} vs {result['first']}: wins {result['second_wins']}, "
                  f"losses {result['first_wins']}, ties {result['ties']} on {result['rows']} "
                  f"rows; win rate {result['second_win_rate']:.3f} "
                  f"({result['low']:.3f}–{result['high']:.3f}); {judge}", highlight=False)
        rate = result["flip_rate"]
        out.print(f"position bias: the verdict flipped with the order in "
                  f"{result['position_flips']} rows" + (f" ({rate:.0%} of those judged)"
                                                          if rate is not None else ""),
                  highlight=False)
    out.print(f"judgements: {result['path']}", highlight=False)


@app.command()
def baseline(
    recipe: Path = typer.Argument(..., help="recipe YAML (base_model, task, data.train, data.test)"),
    strategies: Optional[str] = typer.Option(None, help="comma-separated: zero-shot,few-shot,many-shot,similar-shot,rag"),
    rerun: bool = typer.Option(False, help="score again even if the registry has the result"),
    as_json: bool = JSON_OPT,
) -> None:
    """Score prompting baselines on the recipe's test data: the yardstick fine-tuning must beat.

    Example: tuneloop baseline examples/banking77/recipe.yaml --strategies zero-shot,few-shot
    """
    from tuneloop.baselines.strategies import recipe_baselines
    from tuneloop.project import load_recipe

    parsed = load_recipe(recipe)
    results = recipe_baselines(parsed, strategies.split(",") if strategies else None, rerun=rerun,
                               on_phase=lambda p: err.print(f"[dim]{p}[/]"))
    if as_json:
        print_json(results)
        return
    print_scoreboard(parsed.task, results, title=f"scoreboard: {parsed.base_model}")


@app.command()
def gate(run_id: str, as_json: bool = JSON_OPT) -> None:
    """Exit 0 only if the run beats the best prompting baseline by the recipe's margin.

    Example: tuneloop gate run-20261123-ab12cd && deploy.sh
    """
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    run = Registry.open(workspace()).get_run(run_id)
    verdict = (run.metrics or {}).get("gate")
    if verdict is None:
        raise TuneloopError(f"run {run.id} has no gate verdict: it needs data.test and at least "
                            "one baseline in its recipe")
    if as_json:
        print_json(verdict)
    else:
        word = "[green]PASSED[/]" if verdict["passed"] else "[red]FAILED[/]"
        out.print(f"{run.id}: {word} — {verdict['metric']} {verdict['run_value']:.3f} vs best "
                  f"baseline {verdict['best_baseline']} {verdict['best_baseline_value']:.3f} "
                  f"(gain {verdict['gain']:+.3f}, margin {verdict['margin']})")
    raise typer.Exit(0 if verdict["passed"] else 1)


@runs_app.command("list")
def runs_list(as_json: bool = JSON_OPT) -> None:
    """List runs, newest first.  Example: tuneloop runs list"""
    from tuneloop.project import workspace
    from tuneloop.store import Registry
    from tuneloop import methods

    runs = Registry.open(workspace()).list_runs()
    if as_json:
        print_json([{"id": r.id, "status": r.status, "task": r.task, "base_model": r.base_model,
                      "method": r.method, "created": r.created, "metrics": r.metrics} for r in runs])
        return
    table = Table(Column("id", no_wrap=True), "status", "task", "base model", "method",
                  "headline", Column("created", no_wrap=True))
    for r in runs:
        key = methods.headline(r.method, r.task)
        metric = (r.metrics or {}).get(key)
        table.add_row(r.id, r.status, r.task, r.base_model, r.method,
                      f"{metric:.3f}" if isinstance(metric, float) else "–", f"{r.created:%Y-%m-%d %H:%M}")
    out.print(table)


@runs_app.command("report")
def runs_report(
    run_id: str,
    html_out: Optional[Path] = typer.Option(None, "--out", help="where to write the page "
                                            "(default: runs/RUN/report.html)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Write a run's HTML report (scoreboard with intervals, curves, errors, forgetting check,
    judge, lineage, cost); --json prints the same numbers.  Example: tuneloop runs report RUN"""
    from tuneloop.evaluate import run_report
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    path, data = run_report.write(run_id, Registry.open(workspace()), workspace(), html_out)
    if as_json:
        print_json({**data, "path": str(path)})
        return
    out.print(f"report: {path}", highlight=False)


@runs_app.command("show")
def runs_show(run_id: str, as_json: bool = JSON_OPT) -> None:
    """Show one run: recipe, status, metrics, artifacts.  Example: tuneloop runs show run-2026..."""
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    r = Registry.open(workspace()).get_run(run_id)
    info = {"id": r.id, "name": r.name, "status": r.status, "task": r.task, "method": r.method,
            "base_model": r.base_model, "created": r.created, "wall_s": r.wall_s,
            "adapter_path": r.adapter_path, "error": r.error, "recipe": r.recipe,
            "metrics": r.metrics}
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = json.dumps({k: v for k, v in value.items() if not isinstance(v, dict)}, default=str)
        out.print(f"[bold]{key}[/]: {value}", highlight=False)


@models_app.command("list")
def models_list(as_json: bool = JSON_OPT) -> None:
    """The base-model catalog.  Example: tuneloop models list"""
    from tuneloop.models import catalog

    entries = list(catalog().values())
    if as_json:
        print_json([e.__dict__ for e in entries])
        return
    table = Table("id", "parameters", "context", "licence", "instruction-tuned")
    for e in entries:
        table.add_row(e.id, f"{e.parameters / 1e6:.0f}M", str(e.context_length), e.licence["name"],
                      "yes" if e.instruction_tuned else "no")
    out.print(table)


@app.command()
def demo(as_json: bool = JSON_OPT) -> None:
    """The whole loop on a banking77 subset: validate, zero-shot baseline, LoRA, evaluate, report.

    Example: tuneloop demo
    """
    from tuneloop.demo import run_demo

    result = run_demo(out, err)
    if as_json:
        print_json(result)


@models_app.command("prepare")
def models_prepare(model: str = typer.Argument("smollm2-135m-instruct")) -> None:
    """Convert a catalog model once (GGUF → float32 safetensors cache) so later loads are fast.

    Example: tuneloop models prepare smollm2-135m-instruct
    """
    from tuneloop.models import resolve

    out.print(f"{model}: {resolve(model)}")


@models_app.command("compare")
def models_compare(
    recipe: Path = typer.Argument(..., help="recipe YAML (task, data.train, data.test)"),
    model_list: str = typer.Option(..., "--models", help="comma-separated catalog ids or folders"),
    tolerance: float = typer.Option(0.02, help="recommend the smallest model within this of the best"),
    train_steps: int = typer.Option(0, help="also run a short LoRA of this many steps per model"),
    accept_licence: list[str] = typer.Option([], help="accept this licence for the comparison"),
    as_json: bool = JSON_OPT,
) -> None:
    """Score candidate base models on the task and recommend the smallest good enough one.

    Example: tuneloop models compare examples/banking77/recipe.yaml
             --models smollm2-135m-instruct,gemma3-270m --accept-licence "Gemma Terms of Use"
    """
    from tuneloop.train.compare import compare
    from tuneloop.project import load_recipe

    result = compare(load_recipe(recipe), [m.strip() for m in model_list.split(",") if m.strip()],
                     tolerance=tolerance, train_steps=train_steps, accept=accept_licence,
                     on_phase=lambda p: err.print(f"[dim]{p}[/]"))
    if as_json:
        print_json(result)
        return
    table = Table("model", result["headline"], "strategy", "LoRA", "p50 ms", "p95 ms", "tok/s",
                  "peak MB", "params", "context", "licence", title="model comparison")
    for r in result["rows"]:
        if "refused" in r:
            table.add_row(r["model"], "refused", *["–"] * 8, r["licence"])
            continue
        table.add_row(r["model"], f"{r['quality']:.3f}", r["strategy"], cell(r.get("lora")),
                      cell(r["latency_p50_ms"]), cell(r["latency_p95_ms"]), cell(r["tokens_per_s"]),
                      cell(r["peak_rss_mb"]), f"{r['parameters'] / 1e6:.1f}M",
                      str(r["context_length"]), r["licence"])
    out.print(table)
    for r in result["rows"]:
        if "refused" in r:
            err.print(f"[yellow]{r['model']}:[/] {r['refused']}", highlight=False)
    rec = result["recommendation"]
    if rec:
        out.print(f"recommendation: [bold]{rec['model']}[/] ({rec['reason']})", highlight=False)
    else:
        raise TuneloopError("no candidate could be scored; see the refusals above")


# Each stage's commands, on the app's top level (train, estimate, serve, keys, synth, ...)
for commands in (train_commands, serve_commands, synth_commands):
    app.add_typer(commands.app)
