"""The web console in a real headless Chromium against the real server on loopback: the
playground streams two models side by side, a thumbs-down with a correction lands in the
feedback store and in the exported dataset, and a second tenant does not see the first's
models. Screenshots are written; the pages log no console errors."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import make_rows, two_tenant_server, write_jsonl
from tuneloop.serve.feedback import export

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install "
                                                         "chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def console(tiny_model, tmp_path_factory):
    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("console"), worker=False) as srv:
        yield srv


def open_page(browser, url, key, errors):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.fill("#key", key)
    page.click("#login button")
    page.wait_for_selector("input[name=model]")
    return page


def test_playground_streams_two_models_and_feedback_reaches_the_dataset(console, tmp_path):
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = open_page(browser, console["url"], console["keys"]["acme"], errors)
        models = page.eval_on_selector_all("input[name=model]", "els => els.map(e => e.value)")
        assert "acme-intents" in models and "globex-intents" not in models and len(models) == 2
        page.fill("#prompt", "i lost my card today")
        page.fill("#max-tokens", "12")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.answer[data-done]').length == 2",
                               timeout=120_000)
        cards = page.query_selector_all(".answer")
        assert sorted(c.get_attribute("data-model") for c in cards) == sorted(models)
        for c in cards:
            assert "tokens" in c.query_selector(".stats").inner_text()
            assert c.get_attribute("data-completion-id").startswith("chatcmpl-")
        tuned = next(c for c in cards if c.get_attribute("data-model") == "acme-intents")
        tuned.query_selector(".down").click()
        tuned.query_selector(".correction").fill("card_lost")
        tuned.query_selector(".correct button").click()
        page.wait_for_function("[...document.querySelectorAll('.saved')].some("
                               "e => e.textContent == 'Correction saved.')")
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

        other = open_page(browser, console["url"], console["keys"]["globex"], errors)
        seen = other.eval_on_selector_all("input[name=model]", "els => els.map(e => e.value)")
        assert "globex-intents" in seen and "acme-intents" not in seen
        browser.close()
    assert errors == []
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    summary = export(console["registry"], "acme-intents", tmp_path / "fb", tenant="acme")
    rows = [json.loads(line) for line in (tmp_path / "fb" / "sft.jsonl").open()]
    assert rows[-1]["messages"][-1] == {"role": "assistant", "content": "card_lost"}
    assert rows[-1]["messages"][0]["content"] == "i lost my card today"
    assert summary["datasets"]["sft"]["rows"] >= 1


@pytest.fixture(scope="module")
def console_with_worker(tiny_model, tmp_path_factory):
    """A server whose job worker trains what the Runs page starts; no runs yet."""
    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("console-jobs"), deployed=False,
                           worker=True) as srv:
        yield srv


def chat_file(path, n=24):
    rows = [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in make_rows(n)]
    return write_jsonl(path, rows)


def test_a_run_started_from_the_page_succeeds_and_shows_its_curve(console_with_worker, tmp_path):
    from playwright.sync_api import sync_playwright

    server, errors = console_with_worker, []
    data = chat_file(tmp_path / "train.jsonl")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = open_page(browser, server["url"], server["keys"]["acme"], errors)
        page.click("#nav-runs")
        page.wait_for_selector("#base option", state="attached")
        page.set_input_files("#train-file", str(data))
        page.fill("#epochs", "2")
        page.fill("#suffix", "console")
        page.click("#start button")
        page.wait_for_selector("#job:not([hidden])")
        page.wait_for_function("document.getElementById('job-status').dataset.status == "
                               "'succeeded'", timeout=300_000)
        page.wait_for_function("Number(document.getElementById('curve').dataset.points) >= 2")
        assert page.locator("#curve svg polyline").count() == 1
        page.wait_for_function("document.getElementById('jobs').innerText.includes('succeeded')")
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
        job_id = page.inner_text("#job-id")

        other = open_page(browser, server["url"], server["keys"]["globex"], errors)
        other.click("#nav-runs")
        other.wait_for_selector("#base option", state="attached")
        other.click("#refresh")
        other.wait_for_timeout(500)
        assert job_id not in other.inner_text("#jobs")  # another tenant's runs are not shown
        assert other.locator("#jobs tr").count() == 0
        browser.close()
    assert errors == []
    assert (tmp_path / "runs.png").stat().st_size > 10_000
