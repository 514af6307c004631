"""The LLM judge against a tiny OpenAI-compatible judge on loopback: pointwise scores and
their agreement with the metric and with humans, pairwise verdicts in both orders with the
position flips counted, the cache, and the command."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tests.test_synth import teacher  # noqa: F401  (the loopback judge fixture)
from tuneloop.core.formats import file_sha256
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.judge import parse_score, parse_winner, run_judge
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry

TEXTS = ["lost card one", "rate question two", "top up three", "biased card four",
         "biased rate five", "mumble six", "card seven", "rate eight"]
GOLD = ["card_lost", "exchange_rate", "top_up", "card_lost", "exchange_rate", "top_up",
        "card_lost", "exchange_rate"]


def evaluation(registry, ws, test_file, name: str, outputs: list[str]) -> str:
    ds = registry.add_dataset(file_sha256(test_file), str(test_file), len(TEXTS), "classify")
    rows = [{"line": i + 1, "output": o, "prediction": o, "gold": g}
            for i, (o, g) in enumerate(zip(outputs, GOLD))]
    correct = sum(r["prediction"] == r["gold"] for r in rows)
    ev = record_evaluation(registry, ws / "evaluations" / f"ev-{name}",
                           {"metrics": {"accuracy": correct / len(rows)}, "predictions": rows},
                           model=name, dataset=ds.id, strategy=name, task="classify")
    return ev.id


@pytest.fixture()
def evaluations(tmp_path, workspace):
    registry = Registry.open(workspace)
    test_file = write_jsonl(tmp_path / "test.jsonl",
                            [{"text": t, "label": g} for t, g in zip(TEXTS, GOLD)])
    good = evaluation(registry, workspace, test_file, "good", GOLD[:6] + ["top_up", "top_up"])
    bad = evaluation(registry, workspace, test_file, "bad", ["top_up"] * 5 + ["card_lost"] +
                     ["top_up"] * 2)
    return good, bad


def test_replies_are_read_as_json_or_bare_words():
    assert parse_score('{"score": 4, "reason": "ok"}') == (4, "ok")
    assert parse_score("Score: 2") == (2, "")
    assert parse_score("no idea") == (None, "")
    assert parse_winner('{"winner": "B", "reason": "x"}') == "B"
    assert parse_winner("A.") == "A" and parse_winner("Tie") == "tie"
    assert parse_winner("Both are fine") is None and parse_winner("Answer") is None


def test_pointwise_scores_agree_with_the_metric_and_humans(teacher, evaluations, tmp_path,
                                                           workspace):
    good, _ = evaluations
    spec = {"endpoint": teacher.url, "model": "judge"}
    human = write_jsonl(tmp_path / "human.jsonl", [{"line": 1, "score": 5}, {"line": 7, "score": 2},
                                                   {"line": 8, "score": 1}])
    result = run_judge([good], spec, workspace, human_file=human)
    assert result["rows"] == 8 and result["unparsed"] == 1  # "mumble six"
    # Right answers (lines 1-5) score 5, wrong ones (7, 8) score 1.
    assert result["distribution"] == {"1": 2, "2": 0, "3": 0, "4": 0, "5": 5}
    assert result["mean_score"] == pytest.approx(27 / 7)
    assert result["agreement_with_metric"]["agreement"] == 1.0
    assert result["agreement_with_humans"] == {"rows": 3, "exact": pytest.approx(2 / 3),
                                               "within_one": 1.0, "pearson": pytest.approx(
                                                   0.9707, abs=1e-3)}
    assert result["prompt"]["id"] == "pointwise-v1" and len(result["prompt"]["sha256"]) == 16
    saved = json.loads(open(result["path"]).read())
    assert saved["mean_score"] == result["mean_score"]
    unread = [j for j in saved["judgements"] if j["score"] is None]
    assert [j["reply"] for j in unread] == ["hmm, hard to say"]  # kept to show why
    again = run_judge([good], spec, workspace, human_file=human)
    assert again["usage"]["requests"] == 0 and again["usage"]["cached"] == 8


def test_pairwise_asks_both_orders_and_counts_position_flips(teacher, evaluations, workspace):
    good, bad = evaluations
    result = run_judge([bad, good], {"endpoint": teacher.url, "model": "judge"}, workspace)
    # Lines 3, 7 and 8 have the same answer twice: ties, not asked. Line 6 is unreadable.
    assert result["rows"] == 8 and result["identical"] == 3 and result["unparsed"] == 1
    assert sum(teacher.asked.values()) == 10  # both orders of the five rows asked
    # Lines 4 and 5 ("biased") always get "A": one model in one order, the other in the other.
    assert result["position_flips"] == 2 and result["flip_rate"] == pytest.approx(2 / 4)
    # Lines 1 and 2: only the second ("good") matches the reference.
    assert (result["second_wins"], result["first_wins"], result["ties"]) == (2, 0, 5)
    saved = json.loads(open(result["path"]).read())["judgements"]
    unread = [j for j in saved if j["winner"] is None]
    assert len(unread) == 1 and all(unread[0]["replies"])  # the unreadable replies are kept
    assert result["second_win_rate"] == pytest.approx((2 + 2.5) / 7)


def test_judge_command_and_its_errors(teacher, evaluations, workspace):
    from tests.test_cli import assert_user_error, tl

    good, bad = evaluations
    env = {"TUNELOOP_HOME": str(workspace)}
    proc = tl("eval", "judge", bad, good, "--judge-endpoint", teacher.url, "--judge-model", "j",
              "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["position_flips"] == 2
    assert_user_error(tl("eval", "judge", good, env=env), "--judge-run RUN")
    assert_user_error(tl("eval", "judge", good, bad, bad, "--judge-model", "x", env=env),
                      "one run/evaluation")
    with pytest.raises(TuneloopError, match="no run or evaluation"):
        run_judge(["ev-missing"], {"endpoint": teacher.url, "model": "j"}, workspace)
