"""The personal-data recognizer with its trained name model (trained once per machine, a few
minutes on two cores, then cached): names, places and organizations in English and German text,
and the Presidio synthetic test set (read from ../shared/data, skipped where it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.data import pii

pytestmark = pytest.mark.slow
PRESIDIO = Path(__file__).resolve().parent.parent.parent / "shared/data/presidio_pii/test.jsonl"


@pytest.fixture(scope="module")
def detector():
    return pii.Detector()


def test_training_is_cached_by_content_and_writes_a_loadable_model(tmp_path):
    rows = [{"text": f"Please call Anna Schmidt about order {i}", "entities": [[12, 24, "PERSON"]]}
            for i in range(20)] + [{"text": "Please call me about my order", "entities": []}] * 5
    out = pii.train_ner(tmp_path / "ner", rows=rows, epochs=3)
    assert (out / "meta.json").is_file() and not list(tmp_path.glob("ner.*"))  # no temp left
    found = pii.Detector(["PERSON"], model=out).find("Please call Anna Schmidt about order 7")
    assert [(f.type, f.text) for f in found] == [("PERSON", "Anna Schmidt")]
    assert pii.ner_model_path() == pii.ner_model_path()
    assert pii.ner_model_path().name.startswith("pii-ner-")


def test_names_places_and_organizations_are_replaced_consistently(detector):
    row = {"messages": [
        {"role": "user", "content": "Hi, this is Maria Gonzalez from Acme Corp in Chicago. "
                                    "My email is maria.gonzalez@acme.com 🙂"},
        {"role": "assistant", "content": "Thanks Maria Gonzalez, I have updated the account."}]}
    [new], [found], _ = pii.anonymize_rows([row], detector)
    text = json.dumps(new, ensure_ascii=False)
    for original in ("Maria Gonzalez", "maria.gonzalez@acme.com", "Chicago"):
        assert original not in text
    assert "<PERSON_1>" in new["messages"][0]["content"]
    assert "Thanks <PERSON_1>" in new["messages"][1]["content"]  # same person, same placeholder
    assert "🙂" in new["messages"][0]["content"]
    assert {"PERSON", "EMAIL_ADDRESS", "LOCATION"} <= {f.type for f in found}


def test_text_without_personal_data_is_left_alone(detector):
    texts = ["How do I top up my card with a bank transfer?",
             "Wie lange dauert eine Überweisung ins Ausland?",
             "My card payment was declined, why? 😞"]
    assert [detector.find(t) for t in texts] == [[], [], []]


@pytest.mark.skipif(not PRESIDIO.is_file(), reason="needs ../shared/data/presidio_pii")
def test_presidio_synthetic_test_set(detector):
    rows = [json.loads(line) for line in PRESIDIO.open(encoding="utf-8")]
    claimed = {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
               "IP_ADDRESS", "DATE_TIME"}
    found = detector.find_many([r["text"] for r in rows])
    gold = hit = 0
    for row, hits in zip(rows, found):
        for e in row["entities"]:
            if e["label"] in claimed:
                gold += 1
                hit += any(h.type == e["label"] and h.start < e["end"] and e["start"] < h.end
                           for h in hits)
    assert hit / gold >= 0.9  # bench/pii_eval.py reports every type
    anonymized, _, _ = pii.anonymize_rows([{"text": r["text"]} for r in rows], detector)
    leaks = [e["text"] for r, a in zip(rows, anonymized) for e in r["entities"]
             if e["label"] in claimed - {"PERSON"} and e["text"] in a["text"]]
    assert leaks == []
