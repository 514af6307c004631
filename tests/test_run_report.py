"""The run report in a real headless Chromium: it renders without console errors, and the
numbers on the page are the numbers of `tuneloop runs report RUN --json`."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_cli import tl
from tests.test_train_lora import recipe_for
from tuneloop.train.run import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fmt(value) -> str:
    from tuneloop.evaluate.run_report import _fmt

    return _fmt(value)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium; .ci/run "
                                              "installs it)")
def test_report_renders_in_chromium_and_matches_the_json(tiny_model, classify_files, workspace,
                                                         tmp_path):
    from playwright.sync_api import sync_playwright

    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, max_steps=6,
                              baselines=["zero-shot"], evaluators=["answer_length"]),
                   workspace=workspace)
    assert (workspace / "runs" / result["run_id"] / "report.html").is_file()  # written by train
    proc = tl("runs", "report", result["run_id"], "--json", "--out", tmp_path / "r.html",
              env={"TUNELOOP_HOME": str(workspace)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["headline"]["value"] == result["accuracy"]
    assert data["scoreboard"][1]["model"] == "zero-shot"
    assert len(data["curves"]["train"]) == 6 and data["forgetting"]["items"] == 50
    assert data["lineage"]["train_data"]["rows"] == 54  # 60 rows less the validation slice

    expected = {"headline.value": fmt(data["headline"]["value"]),
                "headline.low": fmt(data["headline"]["low"]),
                "headline.high": fmt(data["headline"]["high"]),
                "scoreboard.1.accuracy": fmt(data["scoreboard"][1]["accuracy"]),
                "training.train_tokens": fmt(data["training"]["train_tokens"]),
                "forgetting.fine_tuned.accuracy": fmt(
                    data["forgetting"]["fine_tuned"]["accuracy"]),
                "gate.passed": "passed" if data["gate"]["passed"] else "failed",
                "cost.train_usd": fmt(data["cost"]["train_usd"]),
                "calibration.ece": f"{data['calibration']['ece']:.3f}"}
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "r.html").as_uri())
        shown = {key: page.inner_text(f'[data-key="{key}"]') for key in expected}
        assert page.locator("svg[aria-label='loss curves'] polyline").count() == 2
        bins = data["calibration"]["bins"]  # one bar per occupied bin, plus the frame
        assert page.locator("svg[aria-label='reliability diagram'] rect").count() == len(bins) + 1
        assert sum(b["n"] for b in bins) == data["headline"]["rows"]
        assert "Worst errors" in page.inner_text("body") or data["worst_errors"] == []
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert shown == expected
    assert (tmp_path / "report.png").stat().st_size > 10_000
