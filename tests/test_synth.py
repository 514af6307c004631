"""Synthetic data: a tiny OpenAI-compatible teacher on loopback, asked through the real
`openai` client; the cache, the retries, every filter and the recorded lineage."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import write_jsonl
from tuneloop.errors import TuneloopError
from tuneloop.synth.recipe import SynthRecipe
from tuneloop.synth.run import synthesize

KEYWORDS = {"card": "card_lost", "rate": "exchange_rate", "top up": "top_up"}
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november"]  # distinct words: no near-duplicates


class Teacher:
    """Answers by keyword; counts what it was asked; can refuse or fail on purpose."""

    def __init__(self):
        self.asked: Counter = Counter()  # (user text, seed) answered
        self.requests = 0
        self.refuse_after: int | None = None  # then 401: an interruption the client cannot retry
        self.fail_first = 0  # 503s before answering: retried by the client

    def reply(self, body: dict) -> tuple[int, str]:
        self.requests += 1
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, ""
        if self.refuse_after is not None and sum(self.asked.values()) >= self.refuse_after:
            return 401, ""
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        user = body["messages"][-1]["content"]
        self.asked[(user, body.get("seed"))] += 1
        if "impartial judge" in system:
            return 200, judge_reply(system, user)
        if "grade answers" in system:
            return 200, "2" if "rate" in user.split("Answer:")[0] else "5"
        if "compare two answers" in system:
            return 200, "B"
        if "new examples" in system:
            seed = body.get("seed", 0)
            return 200, ("- my card did not arrive yet\n- my card did not arrive yet!\n"
                         f"2. where can i see the rate for {NAMES[seed]}\n"
                         "- i lost my card alpha\n")  # the last repeats a seed
        if "Reply with the label only" in system:
            if "ambiguous" in user:
                return 200, ["card_lost", "top_up"][body.get("seed", 0) % 2]
            if "nonsense" in user:
                return 200, "weather_report"
            return 200, next((v for k, v in KEYWORDS.items() if k in user), "top_up")
        return 200, f"Answer {body.get('seed', 0)} to: {user}"


def section(user: str, name: str) -> str | None:
    for part in user.split("\n\n"):
        if part.startswith(name + ":\n"):
            return part[len(name) + 2:]
    return None


def judge_reply(system: str, user: str) -> str:
    """A judge that prefers the answer equal to the reference; position-biased on inputs
    that say "biased"; unreadable on inputs that say "mumble"."""
    request = section(user, "Request")
    if "mumble" in request:
        return "hmm, hard to say"
    reference = section(user, "Reference answer")
    if "Two answers" in system:
        if "biased" in request:
            return json.dumps({"winner": "A", "reason": "the first one"})
        a, b = section(user, "Answer A"), section(user, "Answer B")
        winner = "A" if a == reference else "B" if b == reference else "tie"
        return json.dumps({"winner": winner, "reason": "matches the reference"})
    answer = section(user, "Answer")
    return json.dumps({"score": 5 if answer == reference else 1, "reason": "compared"})


@pytest.fixture()
def teacher():
    state = Teacher()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text = state.reply(body)
            if status != 200:
                payload = {"error": {"message": "unavailable", "type": "server_error"}}
            else:
                payload = {"id": "x", "object": "chat.completion", "created": 0,
                           "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                     "total_tokens": 12}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def recipe(server, **kw) -> SynthRecipe:
    base = {"task": "classify", "mode": "label", "name": "synth-test",
            "teacher": {"endpoint": server.url, "model": "tiny", "concurrency": 1,
                        "max_retries": 3, "terms": "Apache-2.0"},
            "labels": ["card_lost", "exchange_rate", "top_up"], "report": {"model": None}}
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return SynthRecipe.model_validate(base)


def inputs(tmp_path: Path, n: int = 12) -> Path:
    words = ["card", "rate", "top up"]
    return write_jsonl(tmp_path / "unlabeled.jsonl",
                       [{"text": f"{NAMES[i]} asks about my {words[i % 3]}"} for i in range(n)])


def read(version) -> list[dict]:
    return [json.loads(line) for line in version.path("train").open()]


def test_interrupted_generation_resumes_without_asking_twice(teacher, tmp_path, workspace):
    spec = recipe(teacher, inputs=[{"path": inputs(tmp_path)}])
    teacher.refuse_after = 5
    with pytest.raises(TuneloopError, match="refused"):
        synthesize(spec, workspace)
    assert sum(teacher.asked.values()) == 5
    teacher.refuse_after = None
    version = synthesize(spec, workspace)
    assert all(count == 1 for count in teacher.asked.values())  # none asked twice
    assert sum(teacher.asked.values()) == 12
    usage = version.report["lineage"]["usage"]
    assert (usage["requests"], usage["cached"]) == (7, 5)
    assert usage["prompt_tokens"] == 70 and usage["completion_tokens"] == 14
    rows = read(version)
    assert len(rows) == 12
    assert all(r["label"] == KEYWORDS[next(k for k in KEYWORDS if k in r["text"])] for r in rows)
    before = teacher.requests
    again = synthesize(spec, workspace)  # everything cached: no request at all
    assert teacher.requests == before and again.id == version.id and not again.created


def test_server_errors_are_retried_with_backoff(teacher, tmp_path, workspace):
    teacher.fail_first = 2
    version = synthesize(recipe(teacher, inputs=[{"path": inputs(tmp_path, 10)}]), workspace)
    usage = version.report["lineage"]["usage"]
    assert usage["failed"] == 0 and usage["requests"] == 10
    assert teacher.requests == 12


def test_label_filters_validity_agreement_judge_and_leaks(teacher, tmp_path, workspace):
    rows = [{"text": f"my card question {NAMES[i]}"} for i in range(10)] + \
           [{"text": "nonsense words here"}, {"text": "an ambiguous one"},
            {"text": "what is the rate today"}, {"text": "the top up is late 7"}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "What is the rate today?",
                                                  "label": "exchange_rate"}])
    existing = write_jsonl(tmp_path / "old.jsonl", [{"text": "the top up is late 8",
                                                     "label": "top_up"}])
    version = synthesize(recipe(teacher, inputs=[{"path": data}], check_against=[test],
                                dedup_against=[existing], consistency={"samples": 4}), workspace)
    lineage = version.report["lineage"]
    assert lineage["dropped"] == {"invalid_label": 1, "disagreement": 1, "matches_test_row": 1,
                                  "repeats_existing": 1}
    assert len(read(version)) == 10
    assert sum(teacher.asked.values()) == 14 * 4  # four samples each, seeds 0..3
    # The judge: answers about rates score 2 and are dropped at min_score 4.
    rows2 = write_jsonl(tmp_path / "in2.jsonl", [{"text": f"rate question {NAMES[i]}"} for i in range(3)]
                        + [{"text": f"card question {NAMES[i]}"} for i in range(10)])
    judged = synthesize(recipe(teacher, inputs=[{"path": rows2}], judge={"enabled": True}),
                        workspace)
    assert judged.report["lineage"]["dropped"] == {"judge_score": 3}
    assert judged.report["lineage"]["prompts"]["judge"].startswith("You grade answers")


def test_expand_filters_seed_repeats_duplicates_and_mislabels(teacher, tmp_path, workspace):
    seeds = write_jsonl(tmp_path / "seeds.jsonl",
                        [{"text": f"i lost my card {NAMES[i]}", "label": "card_lost"}
                         for i in range(6)] +
                        [{"text": f"rate for euro {NAMES[i]}", "label": "exchange_rate"}
                         for i in range(6, 12)])
    version = synthesize(recipe(teacher, mode="expand", seeds=[{"path": seeds}], labels=None,
                                include_seeds=True, expand={"requests": 4, "per_request": 3}),
                         workspace)
    lineage = version.report["lineage"]
    # Requests alternate card_lost / exchange_rate. Each reply: "did not arrive" twice (new
    # only in the first reply), a rate question (new each time), a seed repeated.
    assert lineage["dropped"]["repeats_seed"] == 4
    assert lineage["dropped"]["duplicate"] == 7
    # The rate questions written for card_lost (requests 0 and 2) are labelled otherwise.
    assert lineage["dropped"]["label_mismatch"] == 2
    rows = read(version)
    new = [r for r in rows if not r["text"].startswith(("i lost", "rate for euro"))]
    assert sorted((r["text"], r["label"]) for r in new) == [
        ("my card did not arrive yet", "card_lost"),
        ("where can i see the rate for bravo", "exchange_rate"),
        ("where can i see the rate for delta", "exchange_rate")]
    assert len(rows) == 12 + 3


def test_answers_and_preference_pairs_for_chat(teacher, tmp_path, workspace):
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"How do I do {NAMES[i]}?"}
                                              for i in range(10)])
    answers = synthesize(recipe(teacher, task="chat", mode="answer", labels=None,
                                inputs=[{"path": data}]), workspace)
    rows = read(answers)
    assert rows[0]["messages"][-1] == {"role": "assistant",
                                       "content": f"Answer 0 to: {rows[0]['messages'][0]['content']}"}
    pairs = synthesize(recipe(teacher, task="chat", mode="preferences", labels=None,
                              inputs=[{"path": data}]), workspace)
    rows = read(pairs)
    assert len(rows) == 10
    assert all(r["chosen"].startswith("Answer 1") and r["rejected"].startswith("Answer 0")
               for r in rows)
    assert pairs.report["lineage"]["teacher"] == {"id": f"{teacher.url}#tiny",
                                                  "terms": "Apache-2.0"}


def test_recipe_errors_name_the_fix(tmp_path):
    from tuneloop.synth.recipe import load_synth_recipe

    path = tmp_path / "synth.yaml"
    path.write_text("task: classify\nmode: expand\nteacher: {endpoint: http://x/v1}\n")
    with pytest.raises(TuneloopError) as err:
        load_synth_recipe(path)
    assert "teacher: Value error, an endpoint needs the model name" in str(err.value)
    path.write_text("task: classify\nmode: expand\nteacher: {run: run-1}\nteachr: {}\n")
    with pytest.raises(TuneloopError) as err:
        load_synth_recipe(path)
    assert "teachr: unknown key; did you mean 'teacher'?" in str(err.value)
    path.write_text("task: classify\nmode: expand\nteacher: {run: run-1}\n")
    with pytest.raises(TuneloopError, match="add seeds"):
        load_synth_recipe(path)


def test_training_on_a_teachers_outputs_obeys_the_licence_policy(teacher, tmp_path, workspace,
                                                                  tiny_model):
    from tuneloop.project import recipe_from_dict
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    spec = recipe(teacher, inputs=[{"path": inputs(tmp_path)}],
                  teacher={"terms": "Hosted API Terms"})
    version = synthesize(spec, workspace)
    base = {"base_model": str(tiny_model), "task": "classify", "max_steps": 1, "baselines": [],
            "data": {"train": str(version.path("train"))}}
    with pytest.raises(TuneloopError, match=r"teacher .* under the terms 'Hosted API Terms'.*"
                                            r"accept_licences: \[\"Hosted API Terms\"\]"):
        train(recipe_from_dict(base), workspace=workspace)
    assert Registry.open(workspace).list_runs() == []  # refused before a run was recorded
    result = train(recipe_from_dict({**base, "accept_licences": ["Hosted API Terms"]}),
                   workspace=workspace)
    run = Registry.open(workspace).get_run(result["run_id"])
    assert run.recipe["teachers"] == [{"id": f"{teacher.url}#tiny", "terms": "Hosted API Terms"}]


def test_synth_command_prints_the_version_and_explains_mistakes(teacher, tmp_path, workspace):
    import yaml

    from tests.test_cli import assert_user_error, tl

    recipe_file = tmp_path / "synth.yaml"
    spec = {"task": "classify", "mode": "label", "labels": ["card_lost", "exchange_rate",
                                                            "top_up"],
            "teacher": {"endpoint": teacher.url, "model": "tiny", "terms": "MIT"},
            "inputs": [{"path": "unlabeled.jsonl"}], "report": {"model": None}}
    inputs(tmp_path)
    recipe_file.write_text(yaml.safe_dump(spec))
    proc = tl("synth", recipe_file, "--json", env={"TUNELOOP_HOME": str(workspace)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["id"].startswith("dv-") and out["splits"]["train"]["rows"] == 12
    assert out["lineage"]["teacher"]["terms"] == "MIT"
    proc = tl("synth", recipe_file, env={"TUNELOOP_HOME": str(workspace)})
    assert proc.returncode == 0 and "0 request(s) sent, 12 from the cache" in proc.stdout
    spec["inputs"] = [{"path": "missing.jsonl"}]
    recipe_file.write_text(yaml.safe_dump(spec))
    assert_user_error(tl("synth", recipe_file, env={"TUNELOOP_HOME": str(workspace)}),
                      "missing.jsonl")


def test_a_local_run_teaches_in_batches_and_its_samples_are_cached(tiny_model, classify_files,
                                                                   tmp_path, workspace):
    from conftest import make_rows
    from tuneloop.project import recipe_from_dict
    from tuneloop.train.run import train

    train_file, test_file = classify_files
    run = train(recipe_from_dict({"base_model": str(tiny_model), "task": "classify",
                                  "head": "none",  # a teacher writes its labels
                                  "baselines": [], "max_steps": 10, "learning_rate": 5e-3,
                                  "forgetting": {"enabled": False},
                                  "batch_tokens": 256, "data": {"train": str(train_file)}}),
                workspace=workspace)
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl",
                            [{"text": r["text"] + " new"} for r in make_rows(15, seed=7)])
    spec = SynthRecipe.model_validate({
        "task": "classify", "mode": "label", "teacher": {"run": run["run_id"], "max_tokens": 8},
        "inputs": [{"path": unlabeled}], "seeds": [{"path": train_file}], "include_seeds": True,
        "consistency": {"samples": 2, "min_agreement": 1.0}, "report": {"model": None}})
    first = synthesize(spec, workspace)
    lineage = first.report["lineage"]
    assert lineage["teacher"] == {"id": f"local:{run['run_id']}", "terms": None}
    assert lineage["usage"]["requests"] == 30 and lineage["usage"]["completion_tokens"] > 0
    assert lineage["synthetic_rows"] + sum(lineage["dropped"].values()) == 15
    labels = {"card_lost", "exchange_rate", "top_up"}
    assert all(json.loads(line)["label"] in labels for line in first.path("train").open())
    again = synthesize(spec, workspace)
    assert again.report["lineage"]["usage"]["requests"] == 0
    assert again.report["lineage"]["usage"]["cached"] == 30
    assert again.id == first.id


def test_extracted_fields_must_be_a_flat_object_with_known_keys():
    from tuneloop.synth.run import _valid
    from tuneloop.synth.teacher import Reply
    from tuneloop.tasks import TaskInfo

    info = TaskInfo("extract", fields=("total", "date"))
    assert _valid("extract", info, Reply('{"total": "9.50"}')) == (
        {"total": "9.50", "date": ""}, None)
    assert _valid("extract", info, Reply('{"total": 1, "vendor": "x"}'))[1] == "unknown_field"
    assert _valid("extract", info, Reply('{"total": {"a": 1}}'))[1] == "nested_value"
    assert _valid("extract", info, Reply("total is 9.50"))[1] == "invalid_json"
    assert _valid("extract", info, Reply('{"total": "9', truncated=True))[1] == "truncated"
    assert _valid("extract", info, None)[1] == "teacher_failed"
