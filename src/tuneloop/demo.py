"""`tuneloop demo`: the whole loop on the shipped banking77 subset, with a scoreboard at the end.

validate → prompting baselines → LoRA training → evaluation → gate → scoreboard + HTML report
→ deploy (if the evidence allows) → serve behind the OpenAI API → feedback → feedback datasets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from tuneloop import project
from tuneloop.baselines.strategies import recipe_baselines
from tuneloop.data.validate import validate
from tuneloop.errors import TuneloopError


def find_examples() -> Path:
    """examples/banking77 in the source checkout (or under the current folder)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        folder = root / "examples" / "banking77"
        if (folder / "recipe.yaml").exists():
            return folder
    raise TuneloopError("examples/banking77 not found: run `tuneloop demo` from a checkout of "
                        "the tuneloop repository (the demo data ships in examples/)")


def run_demo(out, err) -> dict:
    """Run every stage, print a scoreboard and write report.html; returns the scoreboard."""
    from tuneloop.terminal import training_progress
    from tuneloop.project import load_recipe
    from tuneloop.train.run import train

    folder = find_examples()
    recipe = load_recipe(folder / "recipe.yaml")
    started = time.perf_counter()

    out.rule("1. validate and prepare the data")
    for path in (recipe.data.train, recipe.data.test):
        report = validate(path, task=recipe.task, model=recipe.base_model)
        out.print(f"{path.name}: {report.valid}/{report.rows} valid, problems: {report.counts or 'none'}")
        if not report.ok:
            raise TuneloopError(f"{path} is invalid; run `tuneloop data validate {path}`")
    recipe = prepare_step(folder, recipe, out)

    out.rule("2. prompting baselines: zero-shot, few-shot, many-shot (the yardstick)")
    t0 = time.perf_counter()
    baselines = recipe_baselines(recipe, on_phase=lambda p: err.print(f"[dim]{p}[/]"))
    baseline_s = time.perf_counter() - t0
    for name, m in baselines.items():
        out.print(f"{name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")

    out.rule("3. LoRA fine-tuning, then 4. evaluation on the test split")
    with training_progress() as progress:
        run = train(recipe, progress=progress, on_phase=lambda p: err.print(f"[dim]{p}[/]"))

    out.rule("5. scoreboard")
    rows = [{"model": name, "accuracy": m["accuracy"],
             "macro_f1": m["macro_f1"], "ms_per_request": m.get("latency_ms_per_request"),
             "usd_per_1k_requests": m.get("cost_per_1k_requests"), "train_tokens_per_s": None,
             "wall_s": None} for name, m in baselines.items()]
    rows.append({"model": "fine-tuned", "accuracy": run["accuracy"],
                 "macro_f1": run["macro_f1"], "ms_per_request": run["latency_ms_per_request"],
                 "usd_per_1k_requests": run["cost_per_1k_requests"],
                 "train_tokens_per_s": run["train_tokens_per_s"], "wall_s": run["wall_s"]})
    columns = ["accuracy", "macro_f1", "ms_per_request", "usd_per_1k_requests",
               "train_tokens_per_s", "wall_s"]
    headers = {"accuracy": "accuracy", "macro_f1": "macro-F1", "ms_per_request": "ms/req",
               "usd_per_1k_requests": "$/1k req", "train_tokens_per_s": "train tok/s",
               "wall_s": "wall s"}
    table = Table("model", *[headers[c] for c in columns],
                  title=f"banking77 subset, {run['test']['n']} test rows, "
                        f"{recipe.base_model} (+ LoRA)")
    for row in rows:
        table.add_row(row["model"], *[_cell(c, row[c]) for c in columns])
    out.print(table)
    verdict = run["gate"]
    notes = [f"gate: {'PASSED' if verdict['passed'] else 'FAILED'} — fine-tuned accuracy "
             f"{verdict['run_value']:.3f} vs best baseline ({verdict['best_baseline']}) "
             f"{verdict['best_baseline_value']:.3f}, gain {verdict['gain']:+.3f}",
             f"{run['train_tokens']} training tokens, peak RSS {run['peak_rss_mb']:.0f} MB",
             f"test rows: {run['test']['n']}; baselines {baseline_s:.0f} s; "
             f"whole demo {time.perf_counter() - started:.0f} s"]
    check = run.get("forgetting")
    if check:
        notes.append(f"forgetting check: {'FLAGGED' if check['flagged'] else 'ok'} — general "
                     f"accuracy {check['base']['accuracy']:.2f} → "
                     f"{check['fine_tuned']['accuracy']:.2f}, reference loss "
                     f"{check['base']['loss']:.3f} → {check['fine_tuned']['loss']:.3f}")
    for note in notes:
        out.print(note)
    out.print(f"report: {run['report']}  (scoreboard, loss curves, worst errors, forgetting "
              "check, lineage, cost)")
    result = {"scoreboard": rows, "gate": verdict, "run_id": run["run_id"],
              "report": run["report"],
              "serving": serve_step(run["run_id"], recipe, out)}
    (project.workspace() / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def prepare_step(folder: Path, recipe, out):
    """Clean, deduplicate, anonymize and split the training file into a dataset version; the
    recipe then trains on its train and validation splits."""
    from tuneloop.data.curate import prepare
    from tuneloop.data.prepare_recipe import load_prepare_recipe

    version = prepare(recipe=load_prepare_recipe(folder / "prepare.yaml"))
    for step in version.report["steps"]:
        removed = ", ".join(f"{k} {v}" for k, v in step["removed"].items()) or "none removed"
        out.print(f"{step['name']}: {step['rows_in']} → {step['rows_out']} ({removed})")
    out.print(f"dataset {version.id}: " + ", ".join(
        f"{k} {v['rows']}" for k, v in version.report["splits"].items()) +
        f"; report: tuneloop data report {version.id}", highlight=False)
    data = recipe.data.model_copy(update={"train": version.path("train"),
                                          "validation": version.path("validation")})
    return recipe.model_copy(update={"data": data})


def _cell(column: str, value) -> str:
    if value is None:
        return "–"
    if column in ("ms_per_request", "train_tokens_per_s", "wall_s"):
        return f"{value:.0f}"
    return f"{value:.4f}" if column.startswith("usd") else f"{value:.3f}"


def serve_step(run_id: str, recipe, out) -> dict:
    """Deploy the run if it earned it, serve it on loopback, ask it three test questions
    through the OpenAI chat API, rate or correct each answer, and export the feedback."""
    import datetime as dt
    import urllib.request

    from tuneloop.core.formats import load_examples
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy, deployments
    from tuneloop.serve.feedback import export
    from tuneloop.store import Registry

    out.rule("6. deploy, serve (OpenAI-compatible API), feedback")
    ws = project.workspace()
    registry = Registry.open(ws)
    name = "banking77-intents"
    try:
        event = deploy(registry, name, run_id, tenant="demo")
        out.print(f"deployed {name} → {run_id}: {event.reason}")
    except TuneloopError as refused:  # the gate failed, or an earlier demo's run is as good
        out.print(f"not deployed: {refused}")
    if name not in [d.name for d in deployments(registry, "demo")]:
        return {"deployment": None}
    key = create_key(registry, "demo", name="demo")[1]

    def call(url, path, body):
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    answers = []
    with running(Settings(workspace=ws, bases=[recipe.base_model], worker=False)) as url:
        for example in load_examples(recipe.data.test, recipe.task)[:3]:
            question = example.messages[-1]["content"]
            reply = call(url, "/v1/chat/completions", {
                "model": name, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": question}]})
            answer = reply["choices"][0]["message"]["content"]
            answers.append({"question": question, "answer": answer, "gold": example.label,
                            "completion_id": reply["id"]})
            out.print(f"POST /v1/chat/completions {question!r} → {answer!r} (gold {example.label})")
            call(url, "/v1/feedback", {"completion_id": reply["id"], **(
                {"rating": 1} if answer.strip() == example.label else {"correction": example.label})})
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    summary = export(registry, name, ws / "datasets" / f"feedback-{name}-{stamp}", tenant="demo")
    out.print(f"feedback → {summary['folder']}: " + ", ".join(
        f"{k} {v['rows']} rows" for k, v in summary["datasets"].items()))
    return {"deployment": name, "answers": answers, "feedback_datasets": summary}
