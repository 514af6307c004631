"""One self-contained HTML report per run, and the same numbers as JSON.

`report_data` gathers the evidence (scoreboard with the interval and the baselines, gate, loss
curves, confusion matrix or per-field table, worst errors with their inputs, the forgetting
check, judgements, custom evaluators, lineage from data to teacher, cost); `render_html` only
formats it, so the page and `tuneloop runs report RUN --json` cannot disagree.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tuneloop.errors import TuneloopError
from tuneloop import methods
from tuneloop.core.files import atomic_write

WORST = 15


def examples_by_line(dataset_id: str | None, task: str, registry) -> dict[int, str]:
    """The input text of each row of a registered dataset ({} when its file is gone)."""
    from tuneloop.core.formats import load_examples
    from tuneloop.store import Dataset

    with registry.session() as s:
        ds = s.get(Dataset, dataset_id) if dataset_id else None
    if ds is None or not Path(ds.path).is_file():
        return {}
    return {e.line: "\n".join(m["content"] for m in e.messages if m["role"] != "system")
            for e in load_examples(Path(ds.path), task)}


def report_data(run_id: str, registry, workspace: Path) -> dict:
    from tuneloop.evaluate.compare import row_scores
    from tuneloop.evaluate.runner import price_per_hour
    from tuneloop.store import Dataset

    run = registry.get_run(run_id)
    metrics = run.metrics or {}
    if run.status != "done":
        raise TuneloopError(f"run {run.id} is {run.status}; a report needs a finished run")
    run_dir = workspace / "runs" / run.id
    test = metrics.get("test") or {}
    headline = methods.headline(run.method, run.task)
    ci = test.get("ci95") or {}
    scoreboard = [{"model": f"fine-tuned ({run.method})", headline: test.get(headline),
                   "low": ci.get("low"), "high": ci.get("high"),
                   "ms_per_request": test.get("latency_ms_per_request"),
                   "usd_per_1k_requests": test.get("cost_per_1k_requests")}]
    for name, m in (metrics.get("baselines") or {}).items():
        scoreboard.append({"model": name, headline: m.get(headline), "low": None, "high": None,
                           "ms_per_request": m.get("latency_ms_per_request"),
                           "usd_per_1k_requests": m.get("cost_per_1k_requests")})
    predictions_file = run_dir / "test" / "predictions.jsonl"
    rows = ([json.loads(line) for line in predictions_file.open(encoding="utf-8")]
            if predictions_file.is_file() else [])
    worst = []
    if rows and methods.method(run.method).trains_on == "answers":  # (pairs have none)
        inputs = examples_by_line(run.test_dataset, run.task, registry)
        scores = row_scores(run.task, rows)
        order = sorted(range(len(rows)), key=lambda i: scores[i])
        worst = [{"line": rows[i]["line"], "input": inputs.get(rows[i]["line"], ""),
                  "output": rows[i]["output"], "gold": rows[i]["gold"],
                  "score": float(scores[i])} for i in order[:WORST] if scores[i] < 1]
    curves_file = run_dir / "curves.json"
    with registry.session() as s:
        train_ds = s.get(Dataset, run.train_dataset) if run.train_dataset else None
        train_info = ({"id": train_ds.id, "path": train_ds.path, "sha256": train_ds.sha256,
                       "rows": train_ds.rows} if train_ds else None)
    versions = ([{"id": v.id, "name": v.name, "parent": v.parent,
                  "lineage": {k: v.report["lineage"].get(k) for k in ("kind", "mode", "teacher")}
                  if v.report.get("lineage") else None}
                 for v in registry.versions_holding(train_ds.sha256)] if train_ds else [])
    train_s = metrics.get("train_s")
    return {
        "run": {"id": run.id, "name": run.name, "task": run.task, "method": run.method,
                "base_model": run.base_model, "status": run.status,
                "started": str(run.started), "finished": str(run.finished),
                "wall_s": run.wall_s, "artifact": run.adapter_path},
        "headline": {"metric": headline, "value": test.get(headline), "low": ci.get("low"),
                     "high": ci.get("high"), "rows": test.get("n")},
        "scoreboard": scoreboard, "gate": metrics.get("gate"),
        "training": {k: metrics.get(k) for k in (
            "steps", "train_tokens", "train_tokens_per_s", "final_train_loss", "final_val_loss",
            "final_val_kl", "fit", "peak_rss_mb", "peak_gpu_mb", "device")},
        "curves": json.loads(curves_file.read_text()) if curves_file.is_file() else None,
        "confusion": test.get("confusion"),
        "per_field": _with_paths(test.get("per_field"), run_dir / "recipe.yaml"),
        "calibration": test.get("calibration"), "worst_errors": worst,
        "value_calibration": test.get("value_calibration"),
        "abstention": {k: test.get(k) for k in ("empty_rows", "empty_row_accuracy",
                                                "hallucination_rate") if k in test},
        "forgetting": _without(metrics.get("forgetting"), "answers"),
        "custom": test.get("custom"), "judgements": _judgements(workspace, run.id, registry),
        "lineage": {"train_data": train_info, "dataset_versions": versions,
                    "licence": run.recipe.get("licence"), "teachers": run.recipe.get("teachers"),
                    "recipe": {k: v for k, v in run.recipe.items()
                               if k not in ("licence", "teachers")}},
        "cost": {"price_per_hour": price_per_hour(), "train_s": train_s,
                 "train_usd": price_per_hour() * train_s / 3600 if train_s else None,
                 "usd_per_1k_requests": test.get("cost_per_1k_requests")},
    }


def _without(d: dict | None, key: str) -> dict | None:
    return {k: v for k, v in d.items() if k != key} if d else None


def _judgements(workspace: Path, run_id: str, registry) -> list[dict]:
    """Summaries of the judge results that involve this run's test evaluation."""
    ids = {e.id for e in registry.evaluations(run_id)}
    out = []
    for path in sorted((workspace / "judgements").glob("*.json")):
        if not any(i in path.stem for i in ids):  # named by the evaluation ids judged
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        out.append({k: result.get(k) for k in (
            "mode", "model", "first", "second", "rows", "mean_score", "low", "high",
            "second_win_rate", "position_flips", "flip_rate", "agreement_with_metric",
            "agreement_with_humans")} | {"judge": result["judge"]["id"],
                                         "prompt": result["prompt"]["id"]})
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _cell(value, key: str | None = None) -> str:
    attr = f' data-key="{html.escape(key)}"' if key else ""
    return f"<td{attr}>{html.escape(_fmt(value))}</td>"


def _curve_svg(curves: dict, width: int = 640, height: int = 240) -> str:
    """Training and validation loss against step as an inline SVG line chart."""
    series = {k: v for k, v in curves.items() if v}
    if not series:
        return ""
    points = [p for v in series.values() for p in v]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y1 = y1 if y1 > y0 else y0 + 1

    def xy(step, loss):
        x = 50 + (width - 60) * (step - x0) / max(1, x1 - x0)
        y = 10 + (height - 40) * (1 - (loss - y0) / (y1 - y0))
        return f"{x:.1f},{y:.1f}"

    colors = {"train": "#3b6ea8", "validation": "#c0392b"}
    parts = [f'<svg role="img" aria-label="loss curves" width="{width}" height="{height}" '
             'xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="system-ui">',
             f'<text x="4" y="14">{y1:.3f}</text><text x="4" y="{height - 30}">{y0:.3f}</text>',
             f'<text x="50" y="{height - 8}">step {x0}</text>'
             f'<text x="{width - 70}" y="{height - 8}">step {x1}</text>']
    for i, (name, pts) in enumerate(series.items()):
        color = colors.get(name, "#555")
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(xy(s, v) for s, v in pts) + '"/>')
        parts.append(f'<text x="{width - 160}" y="{16 + 14 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _reliability_svg(calibration: dict, size: int = 260) -> str:
    """Accuracy against confidence per bin (bars; their width the bin, their darkness its
    share of rows) beside the diagonal a calibrated model would follow."""
    inner, pad = size - 40, 30
    total = sum(b["n"] for b in calibration["bins"]) or 1

    def x(v):
        return pad + inner * v

    def y(v):
        return 10 + inner * (1 - v)

    parts = [f'<svg role="img" aria-label="reliability diagram" width="{size}" height="{size}" '
             'xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="system-ui">',
             f'<rect x="{pad}" y="10" width="{inner}" height="{inner}" fill="none" stroke="#999"/>',
             f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#999" '
             'stroke-dasharray="4 3"/>']
    for b in calibration["bins"]:
        opacity = 0.35 + 0.65 * b["n"] / total
        parts.append(f'<rect x="{x(b["low"]):.1f}" y="{y(b["accuracy"]):.1f}" '
                     f'width="{inner * (b["high"] - b["low"]) - 1:.1f}" '
                     f'height="{inner * b["accuracy"]:.1f}" fill="#3b6ea8" '
                     f'fill-opacity="{opacity:.2f}"><title>confidence {b["low"]:.1f}–'
                     f'{b["high"]:.1f}: accuracy {b["accuracy"]:.3f} over {b["n"]} rows'
                     '</title></rect>')
    parts.append(f'<text x="{pad}" y="{size - 12}">confidence 0</text>'
                 f'<text x="{size - 40}" y="{size - 12}">1</text>'
                 f'<text x="2" y="16">acc 1</text></svg>')
    return "".join(parts)


def render_html(data: dict) -> str:
    """The report page: each section in turn, left out where the run has nothing for it."""
    run, metric = data["run"], data["headline"]["metric"]
    page = [_header_html(run, data["headline"]), _gate_html(data.get("gate")),
            # joined without a line break, as on earlier pages, so those stay byte-identical
            _scoreboard_html(data["scoreboard"], metric) + _training_html(data["training"]),
            _curves_html(data.get("curves")), _confusion_html(data.get("confusion")),
            _calibration_html(data.get("calibration"), data.get("value_calibration")),
            _per_field_html(data.get("per_field")),
            _abstention_html(data.get("abstention")), _worst_errors_html(data["worst_errors"]),
            _forgetting_html(data.get("forgetting")), _custom_html(data.get("custom")),
            _judgements_html(data["judgements"]),
            _lineage_html(data["lineage"], run["artifact"]) + _cost_html(data["cost"])
            + _recipe_html(data["lineage"]["recipe"]) + "</html>"]
    return "\n".join(section for section in page if section)


def _header_html(run: dict, head: dict) -> str:
    """The page head, the title, what was tuned, and the test headline with its interval."""
    from tuneloop.data.report import CSS

    metric = head["metric"]
    title = f"Run {run['id']}" + (f" — {run['name']}" if run.get("name") else "")
    return "\n".join([
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}"
        f"</title><style>{CSS}</style><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(run['task'])} · {html.escape(run['method'])} on "
        f"<code>{html.escape(run['base_model'])}</code> · finished {html.escape(run['finished'])}"
        f"</p><p>Test {html.escape(metric)}: <strong data-key=\"headline.value\">"
        f"{_fmt(head['value'])}</strong> (95% interval <span data-key=\"headline.low\">"
        f"{_fmt(head['low'])}</span> – <span data-key=\"headline.high\">{_fmt(head['high'])}"
        f"</span>, {_fmt(head['rows'])} rows)</p>"])


def _gate_html(gate: dict | None) -> str:
    """Whether the run beat the best baseline by the margin ("" without a gate)."""
    if not gate:
        return ""
    word = "passed" if gate["passed"] else "failed"
    return (f"<p>Gate <strong data-key=\"gate.passed\">{word}</strong>: "
            f"{gate['gain']:+.3f} over the best baseline ({html.escape(gate['best_baseline'])}"
            f", {gate['best_baseline_value']:.3f}); margin {gate['margin']}.</p>")


def _scoreboard_html(scoreboard: list[dict], metric: str) -> str:
    """The fine-tuned model and the baselines: headline metric, interval, speed and price."""
    out = ["<h2>Scoreboard</h2><table><thead><tr><th>model</th>"
           f"<th>{html.escape(metric)}</th><th>95% interval</th><th>ms/request</th>"
           "<th>$/1k requests</th></tr></thead><tbody>"]
    for i, row in enumerate(scoreboard):
        interval = ("–" if row["low"] is None else f"{row['low']:.3f} – {row['high']:.3f}")
        out.append(f"<tr><td>{html.escape(row['model'])}</td>"
                   + _cell(row[metric], f"scoreboard.{i}.{metric}")
                   + f"<td>{interval}</td>" + _cell(row["ms_per_request"])
                   + _cell(row["usd_per_1k_requests"]) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _training_html(training: dict) -> str:
    """The training figures (steps, tokens, final losses, fit, memory, device)."""
    out = ["<h2>Training</h2><table><tbody>"]
    for key, value in training.items():
        out.append(f"<tr><th scope=row>{html.escape(key)}</th>"
                   + _cell(value, f"training.{key}") + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _curves_html(curves: dict | None) -> str:
    """The loss curves chart ("" without curves)."""
    return "<h2>Loss curves</h2>" + _curve_svg(curves) if curves else ""


def _confusion_html(confusion: dict | None) -> str:
    """The 20 most frequent gold → predicted mistakes ("" without a confusion matrix)."""
    if not confusion:
        return ""
    labels = sorted(confusion)
    wrong = sorted(((g, p, n) for g, row in confusion.items() for p, n in row.items()
                    if p != g), key=lambda t: -t[2])[:20]
    return ("<h2>Confusions</h2><p class=muted>The most frequent mistakes (gold → "
            f"predicted) over {len(labels)} labels.</p><table><thead><tr><th>gold</th>"
            "<th>predicted</th><th>rows</th></tr></thead><tbody>"
            + "".join(f"<tr><td>{html.escape(g)}</td><td>{html.escape(p or '(none)')}</td>"
                      f"<td>{n}</td></tr>" for g, p, n in wrong) + "</tbody></table>")


def _calibration_html(calibration: dict | None, values: dict | None = None) -> str:
    """Calibration error, the reliability diagram and its bins ("" without bins); a span
    head's rows (`values`: each value's calibration) are judged by their tag paths, and each
    value it found by its own span's probability."""
    if not (calibration and calibration.get("bins")):
        return ""
    if values is None:
        return ("<h2>Confidence</h2><p>Each prediction's confidence is its label's "
                "probability. Expected calibration error <strong data-key=\"calibration.ece\">"
                f"{calibration['ece']:.3f}</strong> (mean confidence "
                f"{calibration['mean_confidence']:.3f}); a deployment can answer "
                "<code>needs_review</code> below a threshold (<code>tuneloop serve "
                "--review-below P</code>).</p>" + _reliability(calibration, "rows"))
    return ("<h2>Confidence</h2><p>Each row's confidence is the probability of its whole tag "
            "path: that the row is tagged exactly right. Expected calibration error <strong "
            f"data-key=\"calibration.ece\">{calibration['ece']:.3f}</strong> (mean confidence "
            f"{calibration['mean_confidence']:.3f}).</p>" + _reliability(calibration, "rows")
            + "<p>Each value's confidence is its span's probability (the product of its "
            "tokens' tag probabilities), judged right where the field's gold holds the value. "
            + ("The head found no value in these rows.</p>" if not values["bins"] else
               "Expected calibration error <strong data-key=\"value_calibration.ece\">"
               f"{values['ece']:.3f}</strong> (mean confidence {values['mean_confidence']:.3f})."
               "</p>" + _reliability(values, "values")))


def _reliability(calibration: dict, what: str) -> str:
    return (_reliability_svg(calibration)
            + f"<table><thead><tr><th>confidence</th><th>{what}</th><th>accuracy</th>"
            "<th>mean confidence</th></tr></thead><tbody>"
            + "".join(f"<tr><td>{b['low']:.1f} – {b['high']:.1f}</td><td>{b['n']}</td>"
                      + _cell(b["accuracy"]) + _cell(b["confidence"]) + "</tr>"
                      for b in calibration["bins"]) + "</tbody></table>")


def _with_paths(per_field: dict | None, recipe_file: Path) -> dict | None:
    """The test's per-field figures, each with the path its values took (`span`: found in
    the text by the span head; `written`: decoded as JSON) and the share of its training
    values found in their text, from the run's resolved settings."""
    if not per_field or not recipe_file.is_file():
        return per_field
    import yaml

    from tuneloop.tasks import TaskInfo, extract

    saved = yaml.safe_load(recipe_file.read_text()) or {}
    task = TaskInfo.from_dict(saved.get("task") or {"kind": "extract"})
    spanned = extract.spanned(task) if (saved.get("plan") or {}).get("head") == "spans" else []
    return {f: {**v, "path": "span" if f in spanned else "written",
                "in_text": (task.field_info.get(f) or {}).get("in_text")}
            for f, v in per_field.items()}


def _per_field_html(per_field: dict | None) -> str:
    """Exact and normalized match, precision, recall and F1 per extracted field, and the path
    its values took (found in the text, or written)."""
    if not per_field:
        return ""
    return ("<h2>Per field</h2><table><thead><tr><th>field</th><th>path</th>"
            "<th>training values in their text</th><th>exact</th>"
            "<th>normalized</th><th>precision</th><th>recall</th><th>F1</th></tr></thead>"
            "<tbody>" + "".join(
                f"<tr><td>{html.escape(f)}</td><td>{html.escape(v.get('path') or '-')}</td>"
                + _cell(v.get("in_text")) + _cell(v["exact"])
                + _cell(v["normalized"], f"per_field.{f}.normalized")
                + _cell(v.get("precision")) + _cell(v.get("recall")) + _cell(v.get("f1"))
                + "</tr>" for f, v in per_field.items()) + "</tbody></table>")


def _abstention_html(abstention: dict | None) -> str:
    """How the model did on rows with nothing to extract, and how often it made values up."""
    if not abstention:
        return ""
    names = {"empty_rows": "rows with nothing to extract",
             "empty_row_accuracy": "of those, answered with nothing",
             "hallucination_rate": "predicted values found in no input"}
    return ("<h2>Abstention</h2><table><tbody>" + "".join(
        f"<tr><th scope=row>{names[k]}</th>{_cell(v, f'abstention.{k}')}</tr>"
        for k, v in abstention.items()) + "</tbody></table>")


def _worst_errors_html(worst_errors: list[dict]) -> str:
    """The lowest-scoring test rows: input, output and expected answer, each cut to 400."""
    if not worst_errors:
        return ""
    return ("<h2>Worst errors</h2><table><thead><tr><th>line</th><th>input</th>"
            "<th>output</th><th>expected</th></tr></thead><tbody>"
            + "".join(f"<tr><td>{e['line']}</td><td>{html.escape(e['input'][:400])}</td>"
                      f"<td>{html.escape(str(e['output'])[:400])}</td>"
                      f"<td>{html.escape(_fmt(e['gold']) if not isinstance(e['gold'], dict) else json.dumps(e['gold']))}</td></tr>"
                      for e in worst_errors) + "</tbody></table>")


def _forgetting_html(check: dict | None) -> str:
    """General accuracy and reference loss, base against fine-tuned, and why it was flagged."""
    if not check:
        return ""
    word = "flagged" if check["flagged"] else "no loss of general ability beyond the limits"
    return (f"<h2>Forgetting check</h2><p data-key=\"forgetting.flagged\">{word}</p>"
            "<table><thead><tr><th></th><th>base</th><th>fine-tuned</th></tr></thead>"
            "<tbody><tr><th scope=row>general accuracy</th>"
            + _cell(check["base"]["accuracy"])
            + _cell(check["fine_tuned"]["accuracy"], "forgetting.fine_tuned.accuracy")
            + "</tr><tr><th scope=row>reference loss</th>" + _cell(check["base"]["loss"])
            + _cell(check["fine_tuned"]["loss"]) + "</tr></tbody></table>"
            + "".join(f"<p>{html.escape(r)}</p>" for r in check["reasons"]))


def _custom_html(custom: dict | None) -> str:
    """Each value of each custom evaluator ("" without any)."""
    if not custom:
        return ""
    return ("<h2>Custom evaluators</h2><table><tbody>" + "".join(
        f"<tr><th scope=row>{html.escape(name)} · {html.escape(k)}</th>{_cell(v)}</tr>"
        for name, values in custom.items() for k, v in values.items())
        + "</tbody></table>")


def _judgements_html(judgements: list[dict]) -> str:
    """One row per LLM-judge result: mean score or win rate, and its position-flip rate."""
    if not judgements:
        return ""
    out = ["<h2>LLM judge</h2><table><thead><tr><th>mode</th><th>judge</th>"
           "<th>result</th><th>position flips</th></tr></thead><tbody>"]
    for j in judgements:
        result = (f"mean score {_fmt(j['mean_score'])} ({_fmt(j['low'])} – {_fmt(j['high'])})"
                  if j["mode"] == "pointwise" else
                  f"{j['second']} wins {_fmt(j['second_win_rate'])} against {j['first']}")
        out.append(f"<tr><td>{j['mode']} ({html.escape(j['prompt'])})</td>"
                   f"<td>{html.escape(j['judge'])}</td><td>{html.escape(result)}</td>"
                   f"<td>{_fmt(j.get('flip_rate'))}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _lineage_html(lineage: dict, artifact) -> str:
    """Training data, the dataset versions holding it, the base licence and the artifact."""
    train = lineage["train_data"] or {}
    return ("<h2>Lineage</h2><table><tbody>"
            f"<tr><th scope=row>training data</th><td>{html.escape(str(train.get('path')))} "
            f"({_fmt(train.get('rows'))} rows, sha256 {html.escape(str(train.get('sha256'))[:12])})"
            "</td></tr>"
            + "".join(f"<tr><th scope=row>dataset version</th><td>{html.escape(v['id'])} "
                      f"{html.escape(v['name'] or '')}"
                      + (f" · synthetic, teacher {html.escape(str(v['lineage']['teacher']))}"
                         if v["lineage"] else "") + "</td></tr>"
                      for v in lineage["dataset_versions"])
            + f"<tr><th scope=row>base licence</th><td>{html.escape(str((lineage['licence'] or {}).get('name')))}</td></tr>"
            f"<tr><th scope=row>artifact</th><td>{html.escape(str(artifact))}</td></tr>"
            "</tbody></table>")


def _cost_html(cost: dict) -> str:
    """Training cost, price per 1,000 requests and the machine price it assumes."""
    return ("<h2>Cost</h2><table><tbody>"
            f"<tr><th scope=row>training</th>{_cell(cost['train_usd'], 'cost.train_usd')}</tr>"
            f"<tr><th scope=row>$ per 1,000 requests</th>{_cell(cost['usd_per_1k_requests'])}"
            f"</tr><tr><th scope=row>machine price ($/hour)</th>{_cell(cost['price_per_hour'])}"
            "</tr></tbody></table>")


def _recipe_html(recipe: dict) -> str:
    """The training recipe as indented JSON."""
    return "<h2>Recipe</h2><pre>" + html.escape(json.dumps(recipe, indent=1)) + "</pre>"


def write(run_id: str, registry, workspace: Path, path: Path | None = None) -> tuple[Path, dict]:
    """Write the run's report (default runs/RUN/report.html) atomically; (path, data)."""
    data = report_data(run_id, registry, workspace)
    path = path or workspace / "runs" / data["run"]["id"] / "report.html"
    atomic_write(path, render_html(data))
    return path, data
