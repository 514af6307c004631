"""`tuneloop eval compare`: bootstrap intervals that cover, paired tests on hand-checked cases,
and the command on evaluations recorded in a real registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli import assert_user_error, tl
from tuneloop.evaluate import compare as cmp
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry, new_id


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(300):
        values = (rng.random(200) < 0.7).astype(float)
        low, high = cmp.bootstrap_interval(values, seed=trial)
        covered += low <= 0.7 <= high
        assert low <= values.mean() <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_mcnemar_exact_by_hand():
    assert cmp.mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert cmp.mcnemar_exact(1, 9) == cmp.mcnemar_exact(9, 1)
    assert cmp.mcnemar_exact(0, 0) == 1.0
    assert cmp.mcnemar_exact(5, 5) == 1.0


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.6).astype(float)
    same = cmp.paired_bootstrap(a, a.copy())
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = a.copy()
    better[np.flatnonzero(a == 0)[:60]] = 1  # 60 rows fixed, none broken
    result = cmp.paired_bootstrap(a, better)
    assert result["difference"] == pytest.approx(0.2) and result["p_value"] < 0.01
    assert result["low"] > 0


def test_row_scores_per_task():
    rows = [{"prediction": "a", "gold": "a"}, {"prediction": "b", "gold": "a"}]
    assert cmp.row_scores("classify", rows).tolist() == [1.0, 0.0]
    fields = [{"prediction": {"total": "12.50", "date": "2024-01-02"},
               "gold": {"total": "12.50", "date": "2024-01-03"}},
              {"prediction": None, "gold": {"total": "3"}}]
    assert cmp.row_scores("extract", fields).tolist() == [0.5, 0.0]


def _record(registry, ws, lines_right: set[int], dataset: str, n: int = 40, strategy="zero-shot"):
    eval_id = new_id("ev")
    preds = [{"line": i, "output": "x", "prediction": "yes" if i in lines_right else "no",
              "gold": "yes"} for i in range(1, n + 1)]
    record_evaluation(registry, ws / "evaluations" / eval_id,
                      {"metrics": {"accuracy": len(lines_right) / n}, "predictions": preds},
                      model="m", dataset=dataset, strategy=strategy, task="classify")
    return eval_id


def test_compare_command_on_recorded_evaluations(workspace, tmp_path):
    registry = Registry.open(workspace)
    ds = registry.add_dataset("a" * 64, "test.jsonl", 40, "classify").id
    other = registry.add_dataset("b" * 64, "other.jsonl", 40, "classify").id
    a = _record(registry, workspace, set(range(1, 21)), ds)               # 20/40
    b = _record(registry, workspace, set(range(3, 39)), ds, strategy="few-shot")  # 36/40
    env = {"TUNELOOP_HOME": str(workspace)}
    proc = tl("eval", "compare", a, b, "--no-baselines", "--json", "--out", tmp_path / "c.html",
              env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [m["accuracy"] for m in result["models"]] == [0.5, 0.9]
    [pair] = result["pairs"]
    assert (pair["fixed"], pair["broken"]) == (18, 2)  # rows 21-38 fixed; rows 1-2 broken
    assert pair["mcnemar_p"] == pytest.approx(cmp.mcnemar_exact(18, 2))
    assert {e["line"] for e in pair["examples"] if e["change"] == "broken"} == {1, 2}
    page = (tmp_path / "c.html").read_text()
    assert "18 rows fixed, 2 broken" in page and "<script" not in page
    elsewhere = _record(registry, workspace, {1}, other)
    assert_user_error(tl("eval", "compare", a, elsewhere, env=env), "same rows")
    assert_user_error(tl("eval", "compare", a, "ev-nope", env=env), "no run or evaluation")


def test_every_score_carries_its_headline_interval():
    from tuneloop.evaluate.runner import interval

    rows = [{"line": i, "prediction": "a", "gold": "a" if i < 30 else "b"} for i in range(40)]
    ci = interval("classify", rows)
    assert ci["metric"] == "accuracy" and ci["level"] == 0.95
    assert ci["low"] < 0.75 < ci["high"] and ci["high"] - ci["low"] < 0.35
    # Extraction: the interval of micro F1 itself. One row of ten people found (its place
    # missed), ten rows of one person missed: micro F1 is 2*10 / (10 + 21) = 0.645, where a
    # mean of per-row F1 would say 0.95/11. A resample holding the first row k times scores
    # 20k / (20k + 11): 0 for k = 0 (35% of resamples), 0.845 for k = 3 (the 97.5th percentile).
    rows = [{"line": 0, "prediction": {"who": [f"p{i}" for i in range(10)], "where": None},
             "gold": {"who": [f"p{i}" for i in range(10)], "where": "x"}}]
    rows += [{"line": i, "prediction": {"who": [], "where": None},
              "gold": {"who": ["q"], "where": None}} for i in range(1, 11)]
    ci = interval("extract", rows)
    assert ci["metric"] == "field_f1" and ci["low"] < 20 / 31 < ci["high"] <= 1.0
    assert ci["low"] == 0.0 and ci["high"] == 60 / 71
    assert ci["by_field"]["where"] == {"low": 0.0, "high": 0.0}  # the one gold value missed
    assert ci["by_field"]["who"]["high"] == 60 / 68  # k = 3: 30 right of 30 said and 38 gold
