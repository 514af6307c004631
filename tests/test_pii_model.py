"""The personal-data recognizer with its trained name model (trained once per machine, a few
minutes on two cores, then cached): names, places and organizations in English and German text,
and the Presidio synthetic test set (read from ../shared/data, skipped where it is absent)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuneloop.data import pii, pii_model

pytestmark = pytest.mark.slow
PRESIDIO = Path(__file__).resolve().parent.parent.parent / "shared/data/presidio_pii/test.jsonl"


@pytest.fixture(scope="module")
def detector():
    return pii.Detector()


def call_rows() -> list[dict]:
    """Thirty sentences with a person's name and ten without, for a tiny model."""
    names = ["Anna Schmidt", "Peter Novak", "Li Wei", "Omar Haddad", "Julia Rossi"]
    rows = [{"text": f"Please call {n} about order {i}", "entities": [[12, 12 + len(n), "PERSON"]]}
            for i, n in enumerate(names * 6)]
    return rows + [{"text": f"Please call me about order {i}", "entities": []} for i in range(10)]


def test_training_writes_a_loadable_model_and_is_keyed_by_content(tmp_path):
    rows = call_rows()
    out = pii_model.train_ner(tmp_path / "ner", rows=rows, epochs=10)
    assert (out / "meta.json").is_file() and not list(tmp_path.glob("ner.*"))  # no temp left
    found = pii.Detector(["PERSON"], model=out).find("Please call Peter Novak about order 77")
    assert [(f.type, f.text) for f in found] == [("PERSON", "Peter Novak")]
    assert pii_model.ner_model_path().name.startswith("pii-ner-cased-")
    assert pii_model.ner_model_path(epochs=3) != pii_model.ner_model_path()  # settings are in the key
    assert pii_model.ner_model_path(case="uncased") != pii_model.ner_model_path()


def test_the_uncased_layer_adds_what_the_cased_model_left(tmp_path):
    rows = call_rows()
    cased = pii_model.train_ner(tmp_path / "cased", rows=rows, epochs=10)
    uncased = pii_model.train_ner(tmp_path / "uncased", epochs=10, rows=[
        dict(r, text=pii_model.lower_keep(r["text"])) for r in rows])
    for text in ("please call omar haddad about order 5", "Please call Omar Haddad about order 5"):
        alone = pii.Detector(["PERSON"], model=cased).find(text)
        low = pii.Detector(["PERSON"], model=uncased).find(pii_model.lower_keep(text))
        both = pii.Detector(["PERSON"], model=cased, uncased_model=uncased).find(text)
        assert [(f.type, f.start, f.end) for f in low] == [("PERSON", 12, 23)]
        added = [f for f in low if not any(f.start < a.end and a.start < f.end for a in alone)]
        assert [(f.start, f.end) for f in both] == sorted((f.start, f.end) for f in alone + added)
        assert [f.text for f in both if f.start == 12] == [text[12:23]]  # as written, not lowered
    assert pii_model.lower_keep("İstanbul ÄÖ") == "İstanbul äö"  # lengths kept


def test_names_places_and_organizations_are_replaced_consistently(detector):
    row = {"messages": [
        {"role": "user", "content": "Hi, this is Maria Gonzalez from Acme Corp in Chicago. "
                                    "My email is maria.gonzalez@acme.com 🙂"},
        {"role": "assistant", "content": "I have updated the account for Maria Gonzalez."}]}
    [new], [found], _ = pii.anonymize_rows([row], detector)
    # Whether "Acme Corp" reads as a company or a person is the trained model's guess, which
    # differs between machines (the model is trained on each); that it is replaced is not.
    assert re.fullmatch(r"Hi, this is <PERSON_1> from <(ORGANIZATION_1|PERSON_2)> in "
                        r"<LOCATION_1>\. My email is <EMAIL_ADDRESS_1> 🙂",
                        new["messages"][0]["content"]), new["messages"][0]["content"]
    assert new["messages"][1]["content"] == "I have updated the account for <PERSON_1>."


def test_text_without_personal_data_is_left_alone(detector):
    texts = ["How do I top up my card with a bank transfer?",
             "Thank you so much for your help!",
             "Where can I see the exchange rate for yen? 😞"]  # an emoji is not an address
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


def test_a_house_number_before_the_street_belongs_to_the_address(detector):
    found = detector.find("974 Via Roma 131\n Apt. 425\n Montafia")
    assert ("LOCATION", "974 Via Roma 131") in [(f.type, f.text) for f in found]
    assert [(f.type, f.text) for f in detector.find("12 apples in Paris")] == [("LOCATION", "Paris")]
