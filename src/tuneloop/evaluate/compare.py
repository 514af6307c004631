"""`tuneloop eval compare A B ...`: models scored on the same test rows, with the evidence to
tell a real difference from noise.

Each entry is a run (its test evaluation) or an evaluation id (a baseline). For each: the task's
headline metric with a 95% bootstrap interval (1,000 resamples of the test rows, seeded); for
each later entry against the first: the paired difference with its interval and a paired
bootstrap p-value (the rows resampled together, so row difficulty cancels), McNemar's exact test
where the per-row outcome is right/wrong, and the rows it fixed and broke.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneloop import tasks
from tuneloop.errors import TuneloopError
from tuneloop.core.files import atomic_write

RESAMPLES = 1000
LEVEL = 0.95


@dataclass
class Scored:
    """One model's predictions on a test set, in row order."""

    name: str
    evaluation: str
    dataset: str | None
    task: str
    rows: list[dict]  # {"line", "output", "prediction", "gold"}


def row_scores(task: str, rows: list[dict]) -> np.ndarray:
    """The headline metric of each row alone (accuracy: 1/0, field F1, ROUGE-L)."""
    return np.array([tasks.module(task).row_score(r) for r in rows], dtype=float)


def bootstrap_interval(values: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` over resamples of its rows."""
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def bootstrap_f1(counts: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of micro F1, 2 tp / (predicted + gold), over resamples of the rows
    of `counts` (one row per example: values right, predicted, in the gold). The interval of
    the very figure reported, where a mean of per-row F1 would weigh a one-value row like a
    ten-value one."""
    if len(counts) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    sums = counts[rng.integers(0, len(counts), (resamples, len(counts)))].sum(axis=1)
    f1 = 2 * sums[:, 0] / np.maximum(sums[:, 1] + sums[:, 2], 1)
    tail = (1 - level) / 2
    return float(np.quantile(f1, tail)), float(np.quantile(f1, 1 - tail))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = 0) -> dict:
    """Mean difference b - a with its interval, and a two-sided p-value for "no difference"."""
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    # Two-sided: how often the resampled difference falls on the other side of zero.
    p = 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return {"difference": float(diff.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "p_value": min(1.0, p)}


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a binomial test at 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def load(ref: str, registry) -> Scored:
    """A run id (its test evaluation) or an evaluation id, with its predictions."""
    from tuneloop.project import workspace
    from tuneloop.store import Evaluation

    with registry.session() as s:
        ev = s.get(Evaluation, ref)
        if ev is None:
            runs = [e for e in registry.evaluations() if e.run_id and e.run_id.startswith(ref)]
            if not runs:
                raise TuneloopError(f"no run or evaluation '{ref}'; `tuneloop runs list` shows "
                                    "runs, `tuneloop runs show RUN` their baselines")
            ev = runs[0]  # the evaluation made when the run trained, on its test split
    name = ev.run_id if ev.run_id else f"{ev.strategy} ({ev.id})"
    folders = [workspace() / "evaluations" / ev.id]
    if ev.run_id and ev.strategy == "fine-tuned":  # scored when the run trained
        folders.append(workspace() / "runs" / ev.run_id / "test")
    path = next((f / "predictions.jsonl" for f in folders if (f / "predictions.jsonl").is_file()),
                None)
    if path is None:
        raise TuneloopError(f"no predictions on disk for {ref} (looked in "
                            f"{', '.join(map(str, folders))}); score it again")
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    return Scored(name, ev.id, ev.dataset, ev.task, rows)


def gate_baselines(first: Scored, registry) -> list[str]:
    """The latest baseline evaluation of each strategy on the first entry's test set."""
    latest: dict[str, str] = {}
    for ev in registry.evaluations():
        if ev.run_id is None and ev.dataset == first.dataset and ev.task == first.task:
            latest[ev.strategy] = ev.id
    return list(latest.values())


def compare(entries: list[Scored]) -> dict:
    """The comparison of every entry with the first, on the rows they share."""
    if len(entries) < 2:
        raise TuneloopError("compare needs at least two runs or evaluations")
    first = entries[0]
    for other in entries[1:]:
        if other.task != first.task:
            raise TuneloopError(f"{other.name} is a {other.task} evaluation, {first.name} a "
                                f"{first.task} one; compare like with like")
        if other.dataset != first.dataset:
            raise TuneloopError(f"{other.name} was scored on another test set than {first.name} "
                                f"({other.dataset} vs {first.dataset}); compare on the same rows")
    lines = sorted(set.intersection(*({r["line"] for r in e.rows} for e in entries)))
    if not lines:
        raise TuneloopError("the entries share no test rows")
    module = tasks.module(first.task)
    headline = module.ROW_HEADLINE  # (a micro F1 does not split by row: its row mean does)
    scores, models = {}, []
    for e in entries:
        by_line = {r["line"]: r for r in e.rows}
        values = row_scores(e.task, [by_line[n] for n in lines])
        scores[e.name] = (values, by_line)
        low, high = bootstrap_interval(values)
        models.append({"name": e.name, "evaluation": e.evaluation, headline: float(values.mean()),
                       "low": low, "high": high})
        models[-1].update(module.shared_extras([by_line[n] for n in lines]))  # (abstention)
    base_values, base_rows = scores[first.name]
    pairs = []
    for e in entries[1:]:
        values, rows = scores[e.name]
        fixed = [n for n, a, b in zip(lines, base_values, values) if b > a]
        broken = [n for n, a, b in zip(lines, base_values, values) if b < a]
        pair = {"against": first.name, "model": e.name, **paired_bootstrap(base_values, values),
                "fixed": len(fixed), "broken": len(broken),
                "examples": [{"line": n, "change": kind, "gold": rows[n]["gold"],
                              "before": base_rows[n]["prediction"], "after": rows[n]["prediction"]}
                             for kind, group in (("fixed", fixed), ("broken", broken))
                             for n in group[:20]]}
        if module.PAIRED_EXACT:
            pair["mcnemar_p"] = mcnemar_exact(len(fixed), len(broken))
        pairs.append(pair)
    return {"task": first.task, "metric": headline, "rows": len(lines), "level": LEVEL,
            "resamples": RESAMPLES, "models": models, "pairs": pairs}


def fmt_p(p: float) -> str:
    """A p-value as read: resampling cannot resolve below 1/RESAMPLES."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def render_html(result: dict) -> str:
    """The comparison as one self-contained page."""
    from tuneloop.data.report import CSS, html_table

    metric = result["metric"]
    out = [f"<!doctype html><html lang=en><meta charset=utf-8><title>comparison</title>"
           f"<style>{CSS}</style><h1>Comparison on {result['rows']} test rows</h1>",
           f"<p class=muted>{metric} with {int(result['level'] * 100)}% bootstrap intervals "
           f"({result['resamples']} resamples of the rows); differences are paired.</p>",
           html_table(["model", metric, "interval"], [
               [m["name"], f"{m[metric]:.3f}", f"{m['low']:.3f} – {m['high']:.3f}"]
               for m in result["models"]])]
    for p in result["pairs"]:
        verdict = ("a real difference" if p["p_value"] < 0.05 else "not distinguishable from noise")
        out.append(f"<h2>{p['model']} vs {p['against']}</h2><p>difference {p['difference']:+.3f} "
                   f"({p['low']:+.3f} – {p['high']:+.3f}), paired bootstrap p {fmt_p(p['p_value'])}"
                   + (f", McNemar p {fmt_p(p['mcnemar_p'])}" if "mcnemar_p" in p else "")
                   + f": {verdict}. {p['fixed']} rows fixed, {p['broken']} broken.</p>")
        if p["examples"]:
            out.append(html_table(["line", "change", "gold", "before", "after"], [
                [e["line"], e["change"], e["gold"], e["before"], e["after"]] for e in p["examples"]]))
    out.append("</html>")
    return "\n".join(out)


def write_html(result: dict, path: Path) -> None:
    atomic_write(path, render_html(result))
