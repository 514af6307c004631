"""Task metrics on hand-checked cases."""

from __future__ import annotations

import pytest

from tuneloop.tasks import TaskInfo, chat, classify, extract


def test_classify_metrics_by_hand():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "b"]
    m = classify.metrics(preds, golds, [True] * 4)
    assert m["accuracy"] == 0.5
    # a: P=1 R=.5 F=2/3; b: P=1/3 R=1 F=.5; c: P=0 R=0 F=0
    assert m["macro_precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}, "c": {"b": 1}}


def test_classify_output_is_mapped_to_a_known_label():
    info = TaskInfo("classify", labels=("card_arrival", "exchange_rate", "top_up"))
    assert classify.parse("exchange_rate", info) == ("exchange_rate", True)
    assert classify.parse(" Exchange rate.\n", info) == ("exchange_rate", True)
    assert classify.parse("The label is top_up because", info) == ("top_up", False)
    assert classify.parse("card arival", info)[0] == "card_arrival"


def test_extract_metrics_by_hand():
    golds = [{"name": "ACME Ltd", "total": "10.50"}, {"name": "Bob", "total": "3"}]
    preds = [{"name": "acme  ltd", "total": "10.5"}, None]
    m = extract.metrics(preds, golds, [True, False])
    assert m["json_valid_rate"] == 0.5
    assert m["per_field"]["name"] == {"exact": 0.0, "normalized": 0.5}
    assert m["per_field"]["total"]["normalized"] == 0.5
    # 2 true positives, 2 predicted fields, 4 gold fields
    assert m["field_precision"] == 1.0 and m["field_recall"] == 0.5
    assert m["field_f1"] == pytest.approx(2 / 3)


def test_extract_parse_finds_the_json_object():
    info = TaskInfo("extract", fields=("a",))
    assert extract.parse('Sure: {"a": 1} done', info) == ({"a": 1}, True)
    assert extract.parse("no json", info) == (None, False)
    assert extract.parse("[1, 2]", info) == (None, False)


def test_rouge_l():
    m = chat.metrics(["the cat sat", "x"], ["the cat sat", "completely different"], [True, True])
    assert m["rouge_l"] == pytest.approx(0.5)
