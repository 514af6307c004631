"""The web console in a real headless Chromium against the real server on loopback: the
playground streams two models side by side, a thumbs-down with a correction lands in the
feedback store and in the exported dataset, and a second tenant does not see the first's
models. Screenshots are written; the pages log no console errors."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def chromium():
    """A headless Chromium (Debian's, driven by Playwright), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def unexpected(errors: list[str], status: int) -> list[str]:
    """The console errors other than Chromium's note on the one refusal the test provoked."""
    note = f"the server responded with a status of {status}"
    return [e for e in errors if note not in e]


def open_page(browser, url, key, errors):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.fill("#key", key)
    page.click("#login button")
    page.wait_for_selector("input[name=model]")
    return page


def test_playground_marks_an_extractions_values_in_its_input(console):
    """An answer that is a JSON object has each value marked where the prompt holds it (case,
    spacing and punctuation aside, across lines), with its field's name; other answers none."""
    errors = []
    with chromium() as browser:
        page = open_page(browser, console["url"], console["keys"]["acme"], errors)
        marks = page.evaluate("""() => {
            const node = card("x");
            highlight(node, "Anna Smith flew to New\\nYork, USA.", JSON.stringify(
                {name: "anna smith", city: "New York", gone: null, tags: ["USA", "Oslo"]}));
            const plain = card("y");
            highlight(plain, "Anna Smith", "Anna Smith is a name");
            return {marks: [...node.querySelectorAll(".found mark")].map(
                        (m) => [m.dataset.field, m.textContent]),
                    text: node.querySelector(".found").textContent,
                    plain: plain.querySelector(".found").hidden};
        }""")
    assert marks["marks"] == [["name", "Anna Smith"], ["city", "New\nYork"], ["tags", "USA"]]
    assert marks["text"] == "Anna Smith flew to New\nYork, USA." and marks["plain"] is True
    assert not errors


def test_playground_streams_two_models_and_feedback_reaches_the_dataset(console, tmp_path):
    errors = []
    with chromium() as browser:
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
    server, errors = console_with_worker, []
    data = chat_file(tmp_path / "train.jsonl")
    with chromium() as browser:
        page = open_page(browser, server["url"], server["keys"]["acme"], errors)
        page.click("#nav-runs")
        page.wait_for_selector("#base option", state="attached")
        page.set_input_files("#train-file", str(data))
        page.fill("#epochs", "2")
        page.fill("#suffix", "console")
        page.click("#recipe-options summary")
        page.fill("#recipe", "lora: {rank: 2, rnak: 4}")  # a typo is refused before any job
        page.click("#start button")
        page.wait_for_function("document.getElementById('start-status').textContent"
                               ".includes(\"did you mean 'rank'\")")
        assert page.locator("#jobs tr").count() == 0
        page.fill("#recipe", "lora: {rank: 2}\ncheckpoint_every: 2")
        page.click("#start button")
        page.wait_for_selector("#job:not([hidden])")
        page.wait_for_function("document.getElementById('job-status').dataset.status == "
                               "'succeeded'", timeout=300_000)
        page.wait_for_function("Number(document.getElementById('curve').dataset.points) >= 2")
        assert page.locator("#curve svg polyline").count() == 1
        # The run page shows the settings it trained with (the plan made from the recipe) and
        # its checkpoints.
        page.wait_for_function("document.getElementById('job-recipe').dataset.resolved == 'true'")
        page.click("#job-settings summary")
        settings = page.inner_text("#job-recipe")
        assert "rank: 2" in settings and "checkpoint_every: 2" in settings and "plan:" in settings
        assert "step " in page.inner_text("#checkpoints")
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
    assert unexpected(errors, 400) == []
    assert (tmp_path / "runs.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def console_pages(tiny_model, tmp_path_factory):
    """Two tenants; acme's deployment has served two runs (the second deployed on top)."""
    from tests.test_train_lora import recipe_for
    from tuneloop.serve.deploy import deploy, deployed_history
    from tuneloop.train.run import train

    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("console-pages"),
                           worker=False) as srv:
        first = deployed_history(srv["registry"], "acme-intents", "acme")[0]
        folder = srv["folder"]
        second = train(recipe_for(tiny_model, folder / "train.jsonl", folder / "test.jsonl",
                                  max_steps=4, seed=7, baselines=[],
                                  forgetting={"enabled": False}), workspace=folder / "ws")
        deploy(srv["registry"], "acme-intents", second["run_id"], "acme", force=True)
        yield {**srv, "first": first, "second": second["run_id"]}


def test_data_page_checks_an_upload_by_line_and_pages_through_rows(console_pages, tmp_path):
    errors = []
    bad = write_jsonl(tmp_path / "bad.jsonl", [*make_rows(3), '{"text": "no label", "label"',
                                               *make_rows(2, seed=5)])
    good = chat_file(tmp_path / "good.jsonl", n=25)
    with chromium() as browser:
        page = open_page(browser, console_pages["url"], console_pages["keys"]["acme"], errors)
        page.click("#nav-data")
        page.set_input_files("#data-file", str(bad))
        page.click("#upload button")
        page.wait_for_function("document.getElementById('upload-status').className == 'error'")
        message = page.inner_text("#upload-status")
        assert "bad.jsonl" in message and "line 4" in message  # the broken line, by number
        assert page.locator("#files tr").count() == 0  # nothing kept from a bad file

        page.set_input_files("#data-file", str(good))
        page.click("#upload button")
        page.wait_for_selector("#browser:not([hidden])")
        page.wait_for_function("document.getElementById('rows').children.length == 20")
        assert page.inner_text("#page-info") == "rows 1–20 of 25"
        assert page.locator("#files tr").count() == 1
        page.click("#next")
        page.wait_for_function("document.getElementById('rows').children.length == 5")
        lines = page.eval_on_selector_all("#rows tr td:first-child", "els => els.map(e => e.textContent)")
        assert lines == ["21", "22", "23", "24", "25"]
        assert page.is_disabled("#next") and not page.is_disabled("#prev")
        page.screenshot(path=str(tmp_path / "data.png"), full_page=True)

        other = open_page(browser, console_pages["url"], console_pages["keys"]["globex"], errors)
        other.click("#nav-data")
        other.wait_for_timeout(500)
        assert other.locator("#files tr").count() == 0  # acme's file is not globex's
    assert unexpected(errors, 400) == [] and len(errors) == 1  # the refused upload
    assert (tmp_path / "data.png").stat().st_size > 10_000


def test_data_page_prepares_a_dataset_version_with_its_report(console_pages, tmp_path):
    import httpx
    errors = []
    rows = [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in make_rows(40)]
    rows += rows[:4]  # four exact duplicates
    rows += [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}
             for text, label in (("please write to jane.doe@example.com, my card is gone", "card_lost"),
                                 ("what rate do you give for yen? reply to kim@example.org", "exchange_rate"),
                                 ("my top up failed twice, mail ops-team@example.net", "top_up"))]
    raw = write_jsonl(tmp_path / "export.jsonl", rows)
    with chromium() as browser:
        page = open_page(browser, console_pages["url"], console_pages["keys"]["acme"], errors)
        page.click("#nav-data")
        page.set_input_files("#data-file", str(raw))
        page.click("#upload button")
        page.wait_for_selector("#browser:not([hidden])")
        files_before = page.locator("#files tr").count()
        page.select_option("#prep-file", label=f"export.jsonl ({page.inner_text('#browser-file')})")
        page.fill("#prep-name", "support")
        page.click("#prepare summary")
        page.fill("#prep-recipe", "dedup: {exakt: true}")  # a typo: refused, nothing prepared
        page.click("#prepare button")
        page.wait_for_function("document.getElementById('prepare-status').className == 'error'")
        assert "did you mean 'exact'" in page.inner_text("#prepare-status")
        # Names need the trained recognizer; the pattern layer finds the e-mail addresses.
        page.fill("#prep-recipe", "anonymize: {ner: false}\nsplit: {test: 0.2, validation: 0}")
        page.click("#prepare button")
        page.wait_for_function("document.getElementById('prepare-status').textContent"
                               ".startsWith('Prepared dv-')", timeout=120_000)
        page.wait_for_selector("#version-report:not([hidden])")
        assert "Steps" in page.frame_locator("#version-report").locator("body").inner_text()
        page.wait_for_function("document.getElementById('versions').children.length == 1")
        cells = page.eval_on_selector_all("#versions tr td", "els => els.map(e => e.textContent)")
        assert cells[1] == "support" and cells[2] == "chat"
        assert int(cells[5]) >= 4 and "EMAIL_ADDRESS 3" in cells[6], cells
        assert page.locator("#files tr").count() == files_before + 2  # the train and test splits
        page.screenshot(path=str(tmp_path / "data-versions.png"), full_page=True)

        listed = httpx.get(console_pages["url"] + "/v1/tuneloop/datasets",
                           headers={"authorization": "Bearer " + console_pages["keys"]["acme"]}).json()
        version = listed["data"][0]
        steps = {s["name"]: s for s in version["steps"]}
        assert steps["ingest"]["rows_in"] == 47 and steps["dedup_exact"]["removed"] == {"duplicate": 4}
        assert sum(s["rows"] for s in version["splits"].values()) == 47 - version["duplicates"]
        train_file = version["splits"]["train"]["file_id"]
        content = httpx.get(f"{console_pages['url']}/v1/files/{train_file}/content", headers={
            "authorization": "Bearer " + console_pages["keys"]["acme"]}).text
        assert "@example.com" not in content and content.count("\n") == version["splits"]["train"]["rows"]

        other = open_page(browser, console_pages["url"], console_pages["keys"]["globex"], errors)
        other.click("#nav-data")
        other.wait_for_function("document.getElementById('versions-status').textContent"
                                ".startsWith('No dataset versions')")  # acme's are not globex's
        assert httpx.get(f"{console_pages['url']}/v1/tuneloop/datasets/{version['id']}/report",
                         headers={"authorization": "Bearer " + console_pages["keys"]["globex"]}
                         ).status_code == 404
    assert unexpected(errors, 400) == [] and len(errors) == 1  # the refused recipe
    assert (tmp_path / "data-versions.png").stat().st_size > 10_000


def test_evaluations_page_shows_reports_and_compares_two_runs(console_pages, tmp_path):
    import httpx
    errors, second = [], console_pages["second"]
    with chromium() as browser:
        page = open_page(browser, console_pages["url"], console_pages["keys"]["acme"], errors)
        page.click("#nav-evaluations")
        page.wait_for_function("document.getElementById('eval-runs').children.length == 2")
        shown = page.eval_on_selector_all("#eval-runs tr td:first-child", "els => els.map(e => e.textContent)")
        assert set(shown) == {console_pages["first"], second}  # not globex's run
        page.click(f"#eval-runs tr:has-text('{second}')")
        page.wait_for_selector("#report:not([hidden])")
        frame = page.frame_locator("#report")
        assert second in frame.locator("h1").inner_text()
        assert "accuracy" in frame.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        page.click("#compare button")
        page.wait_for_function("document.getElementById('eval-status').textContent.includes('against')")
        compared = page.frame_locator("#report").locator("body").inner_text()
        assert "fixed" in compared and "broken" in compared
    assert errors == []
    other = httpx.get(f"{console_pages['url']}/v1/tuneloop/runs/{second}/report",
                      headers={"authorization": f"Bearer {console_pages['keys']['globex']}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "run_not_found"


def test_deployments_page_promotes_through_the_gate_and_rolls_back(console_pages, tmp_path):
    from tuneloop.serve.deploy import deployed_history

    errors, registry = [], console_pages["registry"]
    with chromium() as browser:
        page = open_page(browser, console_pages["url"], console_pages["keys"]["acme"], errors)
        page.click("#nav-deployments")
        page.wait_for_selector("#deploys tr[data-name='acme-intents']")
        row = page.locator("#deploys tr[data-name='acme-intents']")
        assert console_pages["second"] in row.inner_text()
        # the run has no gate (trained without baselines): promotion is refused, with the reason
        page.fill("#promote-name", "acme-canary")
        page.click("#promote button")
        page.wait_for_function("document.getElementById('promote-status').className == 'error'")
        assert "no evaluation gate" in page.inner_text("#promote-status")
        assert page.locator("#deploys tr").count() == 1
        page.check("#promote-force")
        page.click("#promote button")
        page.wait_for_selector("#deploys tr[data-name='acme-canary']")
        assert "now serves" in page.inner_text("#promote-status")
        assert page.is_disabled("#deploys tr[data-name='acme-canary'] button")

        page.click("#deploys tr[data-name='acme-intents'] button")
        page.wait_for_function("document.getElementById('promote-status').textContent"
                               ".includes('again')")
        page.wait_for_function("document.getElementById('deploy-history').innerText"
                               ".includes('rollback')")
        page.screenshot(path=str(tmp_path / "deployments.png"), full_page=True)
    assert unexpected(errors, 409) == [] and len(errors) == 1  # the refused promotion
    assert deployed_history(registry, "acme-intents", "acme") == [console_pages["first"]]
    assert deployed_history(registry, "acme-canary", "acme") == [console_pages["second"]]


def test_playground_takes_a_dataset_row_examples_and_a_schema_and_saves_test_cases(
        console_pages, tmp_path):
    import httpx
    from sqlalchemy import select

    from tuneloop.store.serving import Completion

    errors, url, key = [], console_pages["url"], console_pages["keys"]["acme"]
    data = chat_file(tmp_path / "shots.jsonl", n=12)
    with data.open("rb") as f:
        uploaded = httpx.post(f"{url}/v1/files", headers={"authorization": f"Bearer {key}"},
                              data={"purpose": "fine-tune"}, files={"file": f}).json()
    first = json.loads(data.read_text().splitlines()[0])["messages"]
    schema = {"type": "object", "properties": {"intent": {"enum": ["card_lost", "balance"]}},
              "required": ["intent"], "additionalProperties": False}
    with chromium() as browser:
        page = open_page(browser, url, key, errors)
        page.click("#nav-data")
        page.click(f"#files tr:has-text('{uploaded['id']}')")
        page.wait_for_selector("#rows tr")
        page.click("#rows tr:first-child button")  # "Try in playground"
        page.wait_for_selector("#page-playground:not([hidden])")
        assert page.input_value("#prompt") == first[0]["content"]
        assert page.inner_text("#reference") == "Expected: " + first[1]["content"]
        for box in page.query_selector_all("input[name=model]"):  # the base and one adapter
            box.set_checked(box.get_attribute("value") in (console_pages["base"], "acme-intents"))
        page.click("#options summary")
        page.select_option("#shots-file", uploaded["id"])
        page.fill("#shots", "2")
        page.fill("#schema", json.dumps(schema))
        page.fill("#max-tokens", "60")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.answer[data-done]').length == 2",
                               timeout=120_000)
        for answer in page.query_selector_all(".answer .text"):
            assert json.loads(answer.inner_text())["intent"] in ("card_lost", "balance")
        tuned = page.locator(".answer[data-model='acme-intents']")
        tuned.locator(".down").click()
        tuned.locator(".correction").fill('{"intent": "card_lost"}')
        tuned.locator(".case").click()
        page.wait_for_function("[...document.querySelectorAll('.saved')].some("
                               "e => e.textContent.startsWith('Saved as test case 1'))")
        page.fill("#schema", "{not json")
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent.includes('JSON')")
        page.screenshot(path=str(tmp_path / "playground-options.png"), full_page=True)
    assert errors == []
    with console_pages["registry"].session() as s:
        logged = {c.model: c.request["messages"] for c in s.scalars(
            select(Completion).where(Completion.tenant == "acme"))}
    assert len(logged[console_pages["base"]]) == 5  # two example turns each, then the prompt
    assert len(logged["acme-intents"]) == 1  # the fine-tuned model answers the prompt alone
    files = httpx.get(f"{url}/v1/files", headers={"authorization": f"Bearer {key}"}).json()["data"]
    cases = next(f for f in files if f["filename"] == "test-cases.jsonl")
    content = httpx.get(f"{url}/v1/files/{cases['id']}/content",
                        headers={"authorization": f"Bearer {key}"}).text
    assert json.loads(content)["messages"] == [first[0], {"role": "assistant",
                                                          "content": '{"intent": "card_lost"}'}]
