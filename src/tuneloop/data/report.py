"""`tuneloop data report VERSION`: what preparation did, as JSON and as one self-contained HTML
page (inline SVG charts, no scripts, nothing fetched), safe to attach to a review.

Examples shown for removed rows are cut to a few hundred characters; rows with personal data are
shown only after anonymization.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tuneloop.core.formats import parse_row

BINS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def token_lengths(files: list[Path], task: str, model: str) -> dict:
    """Histogram of tokens per example as training sees them: the task's prompt and the model's
    chat template included."""
    from tuneloop import models, tasks
    from tuneloop.core.tokenize import encode

    tokenizer = models.load_tokenizer(model)
    examples = []
    for path in files:
        for n, line in enumerate(path.open(encoding="utf-8"), 1):
            example, _, problems = parse_row(json.loads(line), n, task)
            if example is not None:
                examples.append(example)
    if not examples:
        return {}
    kind = tasks.module(task)
    info = tasks.describe(task, examples)
    lengths = sorted(len(encode(tokenizer, kind.prompt(e, info), kind.target(e, info)))
                     for e in examples)
    counts = [0] * (len(BINS) + 1)
    for n in lengths:
        counts[next((i for i, b in enumerate(BINS) if n <= b), len(BINS))] += 1
    labels = [f"≤{b}" for b in BINS] + [f">{BINS[-1]}"]
    while counts and counts[-1] == 0:
        counts.pop()
        labels.pop()
    return {"model": model, "context": models.context_length(model), "bins": labels,
            "counts": counts, "min": lengths[0], "median": lengths[len(lengths) // 2],
            "p95": lengths[int(0.95 * (len(lengths) - 1))], "max": lengths[-1],
            "over_context": sum(n > models.context_length(model) for n in lengths)}


def _bars(title: str, items: list[tuple[str, int]], width: int = 640) -> str:
    """A horizontal bar chart as inline SVG."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1
    row, label_w = 18, min(260, 8 + 7 * max(len(k) for k, _ in items))
    height = row * len(items) + 28
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="12" '
             'font-family="system-ui, sans-serif">',
             f'<text x="0" y="14" font-weight="600">{html.escape(title)}</text>']
    for i, (key, value) in enumerate(items):
        y = 24 + i * row
        w = (width - label_w - 60) * value / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">'
                     f'{html.escape(str(key))}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" '
                     f'fill="#3b6ea8"/><text x="{label_w + w + 4:.1f}" y="{y + 12}">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#1d2430}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccd;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f6}
code{background:#eef1f6;padding:0 3px}.muted{color:#667}td:last-child{min-width:24em}"""


def render_html(report: dict) -> str:
    """The report as one HTML page."""
    title = f"Dataset {report['id']}" + (f" — {report['name']}" if report.get("name") else "")
    out = [f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style><h1>{html.escape(title)}</h1>",
           f"<p class=muted>task <code>{report['task']}</code> · created {report['created']} · "
           f"parent <code>{report.get('parent') or 'none'}</code> · sha256 "
           f"<code>{report['sha256'][:16]}…</code></p>"]
    out.append("<h2>Inputs</h2>" + html_table(["file", "rows", "sha256"], [
        [i["name"], i["rows"], (i.get("sha256") or "")[:16]] for i in report["inputs"]]))
    out.append("<h2>Steps</h2>" + html_table(["step", "in", "out", "changed", "removed"], [
        [s["name"], s["rows_in"], s["rows_out"], s["changed"],
         ", ".join(f"{k}: {v}" for k, v in s["removed"].items()) or "—"]
        for s in report["steps"]]))
    removed = [(f"{s['name']}: {k}", v) for s in report["steps"] for k, v in s["removed"].items()]
    out.append(_bars("Rows removed, by step and reason", removed))
    for s in report["steps"]:
        if s["examples"]:
            out.append(f"<h2>Examples: {html.escape(s['name'])}</h2>")
            keys = [k for k in s["examples"][0] if k != "text"] + ["text"]
            out.append(html_table(keys, [[e.get(k, "") for k in keys] for e in s["examples"]]))
    out.append("<h2>Splits</h2>" + html_table(["split", "rows", "sha256"], [
        [name, info["rows"], info["sha256"][:16]] for name, info in report["splits"].items()]))
    labels = report["splits"].get("train", {}).get("labels")
    if labels:
        out.append(_bars("Label distribution (train)",
                         sorted(labels.items(), key=lambda kv: -kv[1])))
    train = report["splits"].get("train", {})
    if "entities" in train:
        out.append(_bars(f"Values per field (train; {train['empty_rows']} of {train['rows']} "
                         "rows have nothing to extract)",
                         sorted(train["entities"].items(), key=lambda kv: -kv[1])))
    lengths = report.get("token_lengths")
    if lengths:
        out.append("<h2>Token lengths</h2>")
        out.append(f"<p>with <code>{html.escape(lengths['model'])}</code>'s chat template: "
                   f"median {lengths['median']}, p95 {lengths['p95']}, max {lengths['max']}; "
                   f"{lengths['over_context']} over its context of {lengths['context']}.</p>")
        out.append(_bars("Examples per token-length bin", list(zip(lengths["bins"],
                                                                  lengths["counts"]))))
    pii = report.get("pii")
    if pii:
        out.append(f"<h2>Personal data</h2><p>{pii['rows_with_pii']} rows had personal data, "
                   f"replaced in <code>{pii['mode']}</code> mode.</p>")
        out.append(_bars("Findings by type", list(pii["by_type"].items())))
    clusters = report.get("clusters", {})
    if clusters.get("count"):
        out.append(f"<h2>Duplicate clusters</h2><p>{clusters['count']} clusters; the largest:</p>")
        out.append(html_table(["kept", "size", "exact duplicates", "near duplicates (similarity)"], [
            [c["kept"], c["size"], ", ".join(c["exact"]),
             ", ".join(f"{w} ({s})" for w, s in c["near"])] for c in clusters["largest"][:20]]))
    contamination = report.get("contamination")
    if contamination:
        out.append("<h2>Contamination check</h2>" + html_table(["test file", "rows matching training"],
                   [[k, v] for k, v in contamination["test_rows_matched"].items()]))
        out.append(f"<p>{contamination['train_rows_matching']} training rows matched; "
                   f"{contamination['dropped']} removed.</p>")
    out.append("</html>")
    return "\n".join(out)
