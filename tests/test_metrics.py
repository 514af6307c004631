"""Task metrics on hand-checked cases."""

from __future__ import annotations

import json
import math

import pytest

from tuneloop.core.formats import Example
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
    assert m["per_field"]["name"] == {"exact": 0.0, "normalized": 0.5, "precision": 1.0,
                                      "recall": 0.5, "f1": pytest.approx(2 / 3), "gold_values": 2}
    assert m["per_field"]["total"]["normalized"] == 0.5
    # 2 true positives, 2 predicted fields, 4 gold fields
    assert m["field_precision"] == 1.0 and m["field_recall"] == 0.5
    assert m["field_f1"] == pytest.approx(2 / 3)


def test_list_fields_score_as_multisets_and_abstention_is_measured():
    """Several values of one kind: a list is a multiset of normalized values (order aside, a
    repeat counts twice); a value on a row with nothing to extract is a false positive; rows
    with nothing are scored for answering nothing; values found in no input are counted."""
    golds = [{"person": ["Ann Lee", "Bob"], "place": None},
             {"person": None, "place": None},          # nothing to extract
             {"person": None, "place": None},          # nothing to extract
             {"person": ["Cy", "Cy"], "place": "Rome"}]
    preds = [{"person": ["bob", "ann  lee", "Dan"], "place": None},
             {"person": None, "place": None},
             {"person": ["Zed"], "place": None},       # invented: in no input
             {"person": ["Cy"], "place": "rome"}]
    texts = ["Ann Lee met Bob and Dan", "Price range is moderate?", "hello", "Cy and Cy in Rome"]
    rows = [Example(({"role": "user", "content": x},), "", text=x) for x in texts]
    m = extract.metrics(preds, golds, [True] * 4, rows)
    person = m["per_field"]["person"]
    # person: gold 4 values, predicted 5 (3 + 1 + 1), right 3 (ann lee, bob, one cy)
    assert (person["gold_values"], person["precision"], person["recall"]) == (4, 3 / 5, 3 / 4)
    assert m["per_field"]["place"]["f1"] == 1.0
    assert m["field_precision"] == 4 / 6 and m["field_recall"] == 4 / 5
    assert m["empty_rows"] == 2 and m["empty_row_accuracy"] == 0.5
    assert m["hallucination_rate"] == pytest.approx(1 / 6)  # "Zed" of 6 predicted values


def test_the_prompt_target_and_schema_agree_on_one_answer_shape():
    """Every field present in the task's order, null where the row has none: in the target the
    model learns, the keys its prompt names and the schema its decoding is held to."""
    import jsonschema

    info = TaskInfo("extract", fields=("company", "date", "total"),
                    field_info={"company": {"type": "string", "description": "the seller"},
                                "date": {"type": "string"}, "total": {"type": "number"}})
    row = Example(({"role": "user", "content": "ACME 3.50"},), "", fields={"total": 3.5,
                                                                            "company": "ACME"})
    target = json.loads(extract.target(row, info))
    assert list(target) == ["company", "date", "total"] and target["date"] is None
    schema = json.loads(extract.schema(info))
    jsonschema.validate(target, schema)
    assert list(schema["properties"]) == list(target) and schema["required"] == list(target)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"company": "ACME", "date": None}, schema)  # a key missing
    system = extract.prompt(row, info)[0]["content"]
    assert "company (the seller), date, total." in system
    empty = Example(({"role": "user", "content": "nothing here"},), "", fields={})
    assert json.loads(extract.target(empty, info)) == {"company": None, "date": None, "total": None}


def test_extract_parse_finds_the_json_object():
    info = TaskInfo("extract", fields=("a",))
    assert extract.parse('Sure: {"a": 1} done', info) == ({"a": 1}, True)
    assert extract.parse("no json", info) == (None, False)
    assert extract.parse("[1, 2]", info) == (None, False)


def test_rouge_l():
    m = chat.metrics(["the cat sat", "x"], ["the cat sat", "completely different"], [True, True])
    assert m["rouge_l"] == pytest.approx(0.5)


def test_bleu_and_exact_match_by_hand():
    refs = ["the cat sat on the mat", "hello there"]
    m = chat.metrics(["the cat sat on the mat", "Hello there."], refs, [True, True])
    assert m["exact_match"] == 1.0  # case, spacing and the final period aside
    # BLEU is case-sensitive and splits off the period: over the corpus 7/9 unigrams, 5/7
    # bigrams, 4/5 trigrams, 3/3 4-grams match; 9 tokens vs 8, so no brevity penalty.
    assert m["bleu"] == pytest.approx(100 * (7 / 9 * 5 / 7 * 4 / 5 * 3 / 3) ** 0.25)
    m = chat.metrics(["the cat sat on a mat", "bye"], refs, [True, True])
    assert m["exact_match"] == 0.0
    # 5/7 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams; 7 tokens against 8: brevity
    # penalty exp(1 - 8/7).
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 8 / 7) *
                                      (5 / 7 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert "numeric_rows" not in m


def test_final_number_match_and_errors_gsm8k_style():
    assert chat.final_number("so L = 7 losses.\n#### 15") == 15.0
    assert chat.final_number("The total is $1,350.50 in all") == 1350.5
    assert chat.final_number("no digits") is None
    m = chat.metrics(["The answer is 15.", "It costs 1,200 dollars", "I don't know", "text"],
                     ["he won 15\n#### 15", "#### 1000", "#### 3", "plain words"],
                     [True] * 4)
    assert m["numeric_rows"] == 3 and m["numeric_answered"] == 2
    assert m["numeric_match"] == pytest.approx(1 / 3)
    assert m["mae"] == pytest.approx(100.0) and m["mse"] == pytest.approx(20000.0)


def test_field_values_normalize_amounts_and_dates():
    n = extract.normalize
    assert n("RM 1,234.50") == n("1234.5") == n("$1,234.50")
    assert n("25/12/2018") == n("25-12-2018") == n("25 Dec 2018") == n("Dec 25, 2018") \
        == n("2018-12-25") == "2018-12-25"
    assert n("03/04/2019") == "2019-04-03"  # day first
    assert n("  Acme  SDN BHD ") == n("acme sdn bhd")
    # punctuation aside, as a value copied from OCR differs from its annotation
    assert n("No. 3, Jalan 5,") == n("NO 3. JALAN 5") == "no 3 jalan 5"  # (not a date)
    assert n("S/B") == n("S B") != n("SB") and n("No 3, Jalan 6") != n("No 3, Jalan 5")
    assert n("-") == "" and n("D'Cafe") == n("D Cafe")
    assert n("12") == n(12.0)
