"""Data preparation: each step on hand-made rows (non-English text and emoji included), the
version it records, and bad input that records nothing. Personal-data tests here use the
pattern layer only; the trained name recognizer is tested in test_pii_model.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.conftest import DB_KINDS, fresh_db_url, make_rows, write_jsonl
from tests.test_cli import assert_user_error, tl
from tuneloop.data import clean, pii, pii_model
from tuneloop.data.curate import prepare
from tuneloop.data.prepare_recipe import PrepareRecipe, SplitSpec
from tuneloop.data.split import split_groups
from tuneloop.data.dedup import NearDuplicates, semantic_duplicates
from tuneloop.errors import TuneloopError
from tuneloop.store import Registry

ROOT = Path(__file__).resolve().parent.parent


def recipe(**kw) -> PrepareRecipe:
    """Defaults for tests: no name recognizer, no tokenizer report unless asked."""
    base = {"task": "classify", "anonymize": {"ner": False}, "report": {"model": None}}
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return PrepareRecipe.model_validate(base)


def steps(version) -> dict:
    return {s["name"]: s for s in version.report["steps"]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


# -- clean ---------------------------------------------------------------------------------

def test_normalize_nfc_controls_spaces_keeps_emoji_and_indentation():
    decomposed = "Cafe\u0301 \u00fcber\u00a0alles\u200b\x07\r\n\r\n\r\n\r\n  def f():\n      return 1  "
    assert clean.normalize(decomposed) == "Café über alles\n\n  def f():\n      return 1"
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467 ok"  # ZWJ sequence must survive
    assert clean.normalize(family) == family
    assert clean.normalize("مرحبا\u200b بالعالم") == "مرحبا بالعالم"


def test_match_key_ignores_case_punctuation_width_but_not_emoji_or_script():
    assert clean.match_key("Wo ist MEINE Karte?!") == clean.match_key("wo ist meine karte")
    assert clean.match_key("ｶｰﾄﾞ　紛失。") == clean.match_key("カード 紛失")
    assert clean.match_key("I love it 😀") != clean.match_key("I love it 😡")
    assert clean.match_key("Straße") == clean.match_key("STRASSE")  # casefold


def test_clean_drops_short_long_repeated_empty_and_echo_rows():
    s = clean.CleanSettings(max_chars=200)
    cases = {
        "too_short": {"text": " a ", "label": "x"},
        "too_long": {"prompt": "p " * 150, "completion": "ok"},
        "repeated_lines": {"prompt": "\n".join(["buy now", "cheap", "buy now", "cheap", "go"]),
                           "completion": "spam"},
        "empty_reply": {"messages": [{"role": "user", "content": "hi there"},
                                     {"role": "assistant", "content": " \u200b "}]},
        "reply_repeats_prompt": {"prompt": "Wie spät ist es?", "completion": "wie spät ist es"},
    }
    for reason, row in cases.items():
        assert clean.clean_row(row, s)[1] == reason, reason
    kept, reason, changed = clean.clean_row(
        {"prompt": "Hallo 👋\nHallo 👋\nWie geht's?", "completion": "Gut, danke! 🙂"}, s)
    assert reason is None and changed
    assert kept["prompt"] == "Hallo 👋\nWie geht's?"  # the stutter collapsed, the rest kept


# -- dedup ---------------------------------------------------------------------------------

BASES = [
    "My card payment was declined twice at the supermarket this morning and I do not know why",
    "I would like to change the email address linked to my account before the end of the month",
    "Ich habe meine Karte im Urlaub verloren und brauche so schnell wie möglich eine neue",
    "The exchange rate applied to my transfer to Japan looks much worse than the one in the app",
    "Can you explain why a fee was charged when I topped up my account with a foreign card",
]


def paraphrases(text: str, rng: random.Random) -> list[str]:
    """Edits that leave the same example: case, punctuation, a typo, a filler word, an emoji."""
    words = text.split()
    typo = list(text)
    i = rng.randrange(10, len(text) - 10)
    typo[i], typo[i + 1] = typo[i + 1], typo[i]
    return [text.upper() + "!!", "".join(typo), "Hi, " + text + " please.",
            " ".join(words[:5] + ["really"] + words[5:]), text + " 🙏", text.replace(" ", "  ")]


def test_near_duplicates_finds_planted_paraphrases_and_keeps_distinct_rows():
    rng = random.Random(0)
    rows, origin = [], []
    for b, base in enumerate(BASES):
        rows.append({"text": base, "label": f"l{b}"})
        origin.append(b)
    for b, base in enumerate(BASES):
        for p in paraphrases(base, rng):
            rows.append({"text": p, "label": f"l{b}"})
            origin.append(b)
    index = NearDuplicates(threshold=0.8)
    kept = []
    for i, row in enumerate(rows):
        key = clean.match_key(row["text"])
        match, similarity = index.match(key)
        if match is None:
            index.add(i, key)
            kept.append(i)
        else:
            assert origin[match] == origin[i], (row["text"], rows[match]["text"])
            assert 0.8 <= similarity <= 1
    assert kept == list(range(len(BASES)))  # every paraphrase found, every base kept


SHARED_BANKING = ROOT.parent / "shared/data/banking77/test.jsonl"


@pytest.mark.skipif(not SHARED_BANKING.is_file(), reason="needs ../shared/data/banking77")
def test_prepare_never_merges_distinct_banking77_test_rows(workspace):
    rows = read(SHARED_BANKING)
    version = prepare(rows, recipe(anonymize={"enabled": False}, split={"test": 0, "validation": 0}))
    distinct = len({clean.match_key(r["text"]) for r in rows})
    assert steps(version)["dedup_near"]["removed"] == {}
    assert version.report["splits"]["train"]["rows"] == distinct


def test_near_merges_in_shipped_banking77_share_their_label(workspace):
    rows = read(ROOT / "examples/banking77/train.jsonl") + read(ROOT / "examples/banking77/test.jsonl")
    version = prepare(rows, recipe(anonymize={"enabled": False}, split={"test": 0, "validation": 0}))
    label = {f"rows:{i + 1}": r["label"] for i, r in enumerate(rows)}
    merges = [e for e in steps(version)["dedup_near"]["examples"]]
    assert merges  # e.g. "My card hasn't arrived yet." / "My card hasn't arrived." (0.82)
    assert all(label[e["where"]] == label[e["of"]] for e in merges)


def test_semantic_dedup_uses_meaning_not_characters():
    texts = ["How do I reset my password?", "How can I reset my password?",
             "What is the exchange rate for yen?", "Where is my parcel?"]
    found = semantic_duplicates(texts, threshold=0.9)
    assert set(found) == {1} and found[1][0] == 0


# -- split ---------------------------------------------------------------------------------

def test_split_is_stratified_grouped_and_seeded():
    labels = [f"l{i % 4}" for i in range(400)]
    groups = [i // 2 * 2 for i in range(400)]  # pairs: 0,0,2,2,...
    spec = SplitSpec(validation=0.1, test=0.2, seed=3)
    a = split_groups(groups, labels, spec)
    assert a == split_groups(groups, labels, spec)
    assert a != split_groups(groups, labels, SplitSpec(validation=0.1, test=0.2, seed=4))
    for i in range(0, 400, 2):
        assert a[i] == a[i + 1]  # a group never crosses splits
    for label in {"l0", "l1", "l2", "l3"}:
        mine = [s for s, lab in zip(a, labels) if lab == label]
        assert abs(mine.count("test") - 20) <= 2 and abs(mine.count("validation") - 10) <= 2


def test_near_duplicates_kept_when_dedup_off_stay_in_one_split(workspace):
    rng = random.Random(1)
    rows = []
    for k in range(40):
        base = f"{BASES[k % 5]} (case {k * 7919})"
        rows += [{"text": base, "label": f"l{k % 5}"},
                 {"text": paraphrases(base, rng)[1], "label": f"l{k % 5}"}]
    version = prepare(rows, recipe(dedup={"near": {"enabled": False}},
                                   anonymize={"enabled": False},
                                   split={"test": 0.3, "validation": 0}))
    where = {}
    for split in version.report["splits"]:
        for row in read(version.path(split)):
            where[clean.match_key(row["text"])] = split
    for k in range(0, len(rows), 2):
        assert where[clean.match_key(rows[k]["text"])] == where[clean.match_key(rows[k + 1]["text"])]


def test_contamination_check_drops_training_rows_seen_in_a_test_file(tmp_path, workspace):
    rows = make_rows(60, seed=5)
    test_file = write_jsonl(tmp_path / "given_test.jsonl", [rows[3], rows[10],
                                                           dict(rows[20], text=rows[20]["text"] + "!")])
    version = prepare(rows, recipe(anonymize={"enabled": False}, check_against=[test_file],
                                   split={"test": 0, "validation": 0}))
    step = steps(version)["contamination"]
    assert step["removed"] == {"matches_test_row": 3}
    assert {(e["where"], e["test"]) for e in step["examples"]} == {
        ("rows:4", "given_test.jsonl:1"), ("rows:11", "given_test.jsonl:2"),
        ("rows:21", "given_test.jsonl:3")}
    train = {r["text"] for r in read(version.path("train"))}
    assert not {rows[3]["text"], rows[10]["text"], rows[20]["text"]} & train
    assert len(train) == 57


# -- ingest, versions, bad input -----------------------------------------------------------

def test_csv_and_parquet_with_mapping_become_one_version(tmp_path, workspace):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(40, seed=7)
    csv_path = tmp_path / "export.csv"
    csv_path.write_text("utterance,intent,agent\n" + "".join(
        f"\"{r['text']}, ok\",{r['label']},ann\n" for r in rows[:20]), encoding="utf-8")
    pq.write_table(pa.table({"utterance": [r["text"] for r in rows[20:]],
                             "intent": [r["label"] for r in rows[20:]]}), tmp_path / "more.parquet")
    mapping = {"text": "utterance", "label": "intent"}
    r = recipe(inputs=[{"path": csv_path, "mapping": mapping},
                       {"path": tmp_path / "more.parquet", "mapping": mapping}],
               anonymize={"enabled": False})
    version = prepare(recipe=r)
    out = [row for s in version.report["splits"] for row in read(version.path(s))]
    assert len(out) == 40 and all(set(row) == {"text", "label"} for row in out)
    assert any(row["text"].endswith(", ok") for row in out)  # the quoted comma survived
    assert version.report["inputs"][0]["rows"] == 20


@pytest.mark.parametrize("db", DB_KINDS)
def test_versions_are_content_addressed_and_chained_by_name(db, workspace, monkeypatch):
    monkeypatch.setenv("TUNELOOP_DB_URL", fresh_db_url(db, workspace.parent))
    rows = make_rows(50, seed=2)
    first = prepare(rows, recipe(name="support", anonymize={"enabled": False}))
    again = prepare(rows, recipe(name="support", anonymize={"enabled": False}))
    assert again.id == first.id and first.created and not again.created
    second = prepare(rows[:45], recipe(name="support", anonymize={"enabled": False}))
    registry = Registry.open(workspace)
    assert registry.get_version(second.id).parent == first.id
    assert registry.get_version(first.id).parent is None
    splits = registry.get_version(second.id).splits
    assert set(splits) == {"train", "validation", "test"}
    for name, info in second.report["splits"].items():
        assert second.path(name).is_file() and info["rows"] == len(read(second.path(name)))


def test_malformed_row_fails_and_records_nothing(tmp_path, workspace):
    rows = [json.dumps(r) for r in make_rows(30)]
    rows[6] = '{"text": "broken", "label": '
    rows[11] = '{"text": "", "label": "x"}'
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(TuneloopError) as exc:
        prepare(recipe=recipe(inputs=[{"path": path}]))
    assert "line 7: invalid_json" in str(exc.value) and "line 12: missing_content" in str(exc.value)
    assert Registry.open(workspace).list_versions() == []
    assert [p.name for p in (workspace / "datasets").iterdir()] == []  # no partial folder
    skipped = prepare(recipe=recipe(inputs=[{"path": path}], on_error="skip",
                                    anonymize={"enabled": False}))
    ingest = steps(skipped)["ingest"]
    assert ingest["removed"] == {"invalid_json": 1, "missing_content": 1}
    assert {e["where"] for e in ingest["examples"]} == {"raw.jsonl:7", "raw.jsonl:12"}


# -- personal data, pattern layer ----------------------------------------------------------

def test_patterns_find_validated_formats_only():
    detector = pii.Detector(ner=False)
    text = ("Mail jan.kowalski@example.pl or call +49 30 901820; card 4111 1111 1111 1111, "
            "IBAN DE89 3704 0044 0532 0130 00, server 192.168.10.7")
    types = {f.type: f.text for f in detector.find(text)}
    assert types["EMAIL_ADDRESS"] == "jan.kowalski@example.pl"
    assert types["CREDIT_CARD"] == "4111 1111 1111 1111"
    assert types["IBAN_CODE"] == "DE89 3704 0044 0532 0130 00"
    assert types["IP_ADDRESS"] == "192.168.10.7"
    assert "+49 30 901820" in types["PHONE_NUMBER"]
    bad = detector.find("card 4111 1111 1111 1112 and IBAN DE00 3704 0044 0532 0130 00")
    assert not {f.type for f in bad} & {"CREDIT_CARD", "IBAN_CODE"}  # checksums fail
    born = detector.find("Geboren am 22.11.2000, seit 2019-03-07 Kundin; DOB 11/22/2000")
    assert [(f.type, f.text) for f in born] == [("DATE_TIME", "22.11.2000"),
                                                ("DATE_TIME", "2019-03-07"),
                                                ("DATE_TIME", "11/22/2000")]
    assert detector.find("Order 3 of 12, version 2.1, 50/50 split") == []


def test_placeholders_are_consistent_within_a_row_and_reach_the_fields():
    detector = pii.Detector(ner=False)
    row = {"text": "From anna@firma.de: please reply to anna@firma.de, not bob@firma.de 😊",
           "fields": {"sender": "anna@firma.de", "amount": "12"}}
    [new], [found], _ = pii.anonymize_rows([row], detector)
    assert new["text"] == ("From <EMAIL_ADDRESS_1>: please reply to <EMAIL_ADDRESS_1>, "
                           "not <EMAIL_ADDRESS_2> 😊")
    assert new["fields"] == {"sender": "<EMAIL_ADDRESS_1>", "amount": "12"}
    assert len(found) == 4 and row["text"].startswith("From anna")  # 3 in text, 1 in fields; input untouched


def test_reversible_round_trip_and_fake_mode(tmp_path, workspace):
    detector = pii.Detector(ner=False)
    rows = [{"prompt": f"Kontakt: kunde{i}@beispiel.de, Tel. +49 89 1234567{i}", "completion": "ok"}
            for i in range(5)] + [{"prompt": "nothing personal here", "completion": "fine"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = pii.anonymize_file(src, tmp_path / "anon.jsonl", detector, "reversible",
                                workspace=workspace)
    anon = read(tmp_path / "anon.jsonl")
    assert result["rows_with_pii"] == 5 and "kunde0@beispiel.de" not in json.dumps(anon)
    assert b"kunde0" not in Path(result["map"]).read_bytes()  # the map is encrypted
    pii.reidentify_file(tmp_path / "anon.jsonl", tmp_path / "back.jsonl", result["map"], workspace)
    assert read(tmp_path / "back.jsonl") == rows
    fake = pii.anonymize_file(src, tmp_path / "fake.jsonl", detector, "fake")
    faked = read(tmp_path / "fake.jsonl")
    assert fake["rows_with_pii"] == 5 and "beispiel.de" not in json.dumps(faked)
    assert "@" in faked[0]["prompt"] and "<" not in faked[0]["prompt"]
    pii.anonymize_file(src, tmp_path / "fake2.jsonl", detector, "fake")
    assert read(tmp_path / "fake2.jsonl") == faked  # seeded by the original: reruns agree


def test_prepare_anonymizes_and_report_keeps_no_originals(workspace):
    rows = make_rows(40, seed=9)
    rows[0] = {"text": "refund to DE89 3704 0044 0532 0130 00 please, mail ola@nordmann.no",
               "label": rows[0]["label"]}
    version = prepare(rows, recipe(split={"test": 0, "validation": 0}))
    out = "".join(p.read_text() for p in version.folder.glob("*.jsonl"))
    assert "DE89" not in out and "ola@nordmann.no" not in out and "<IBAN_CODE_1>" in out
    assert version.report["pii"]["by_type"] == {"IBAN_CODE": 1, "EMAIL_ADDRESS": 1}
    assert "ola@nordmann.no" not in json.dumps(version.report)


# -- command line --------------------------------------------------------------------------

def test_cli_prepare_report_and_errors(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path / "ws")}
    data = write_jsonl(tmp_path / "raw.jsonl", make_rows(40, seed=4))
    spec = tmp_path / "prepare.yaml"
    spec.write_text(f"name: demo\ntask: classify\ninputs: [{{path: {data.name}}}]\n"
                    "anonymize: {ner: false}\nreport: {model: null}\n")
    proc = tl("data", "prepare", spec, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)["id"]
    proc = tl("data", "report", version, env=env)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "ws/datasets" / version / "report.html").read_text()
    assert "<svg" in page and "dedup_exact" in page and "<script" not in page
    listed = json.loads(tl("data", "versions", "--json", env=env).stdout)
    assert [v["id"] for v in listed] == [version]
    spec.write_text("task: classify\ninputs: [{path: raw.jsonl}]\ndedup: {nearr: {}}\n")
    assert_user_error(tl("data", "prepare", spec, env=env), "dedup.nearr", "did you mean 'near'")
    assert_user_error(tl("data", "report", "dv-nope", env=env), "tuneloop data versions")
    assert_user_error(tl("data", "prepare", data, env=env), "--task")
    scan = tl("data", "pii-scan", data, "--no-ner", "--json", env=env)
    assert scan.returncode == 0 and json.loads(scan.stdout)["rows_with_pii"] == 0


def test_python_api_takes_a_datasets_dataset(workspace):
    from datasets import Dataset

    rows = make_rows(30, seed=11) + [{"text": "Grüße aus Köln 🇩🇪, rufen Sie +49 221 1234567 an",
                                      "label": "top_up"}]
    version = prepare(Dataset.from_list(rows), recipe(split={"validation": 0, "test": 0},
                                                      dedup={"near": {"enabled": False}}))
    out = read(version.path("train"))
    assert len(out) == 31 and version.report["inputs"][0]["name"] == "rows"
    german = next(r for r in out if r["text"].startswith("Grüße"))
    assert german["text"] == "Grüße aus Köln 🇩🇪, rufen Sie <PHONE_NUMBER_1> an"


def test_shipped_preparation_recipe_parses():
    from tuneloop.data.prepare_recipe import load_prepare_recipe

    spec = load_prepare_recipe(ROOT / "examples/banking77/prepare.yaml")
    assert spec.inputs[0].path.is_file() and spec.check_against[0].is_file()


def test_entity_swap_moves_spans_with_the_new_values_and_keeps_case():
    import random as rnd

    row = {"text": "Ask Anna Schmidt at ACME in berlin, card 4111 1111 1111 1111.",
           "entities": [[4, 16, "PERSON"], [20, 24, "ORGANIZATION"], [28, 34, "GPE"],
                        [41, 60, "CREDIT_CARD"]]}
    fakers = pii_model._swap_fakers(0)
    pools = {"PERSON": ["Li Wei"], "ORGANIZATION": ["Initech"], "GPE": ["Oslo"]}
    texts = set()
    for seed in range(6):
        out = pii_model.swap_entities(row, pii_model.stand_ins(rnd.Random(seed), pools, fakers))
        texts.add(out["text"])
        values = {label: out["text"][s:e] for s, e, label in out["entities"]}
        assert [label for _, _, label in out["entities"]] == ["PERSON", "ORGANIZATION", "GPE",
                                                              "CREDIT_CARD"]
        assert values["CREDIT_CARD"] == "4111 1111 1111 1111"  # not a swappable kind
        assert len(values["PERSON"].split()) >= 2 and values["PERSON"] != "Anna Schmidt"
        assert values["ORGANIZATION"].isupper()  # an acronym stays an acronym
        assert values["GPE"] == values["GPE"].lower()  # lower-case stays lower-case
        assert out["text"].startswith("Ask ") and out["text"].endswith(".")
    assert len(texts) == 6  # each copy differs
    rows = pii_model.training_rows(swap_copies=1)
    shipped = [json.loads(line) for line in pii_model.NER_TRAIN.open()]
    negatives = sum(1 for _ in pii_model.NER_NEGATIVES.open())
    assert rows[:len(shipped)] == shipped  # shipped, negatives, a swapped copy of each, WNUT
    wnut17 = sum(1 for _ in pii_model.NER_WNUT17.open()) if pii_model.WNUT17 else 0
    assert len(rows) == (len(shipped) + negatives + sum(1 for r in shipped if r["entities"])
                         + wnut17)


def test_the_recognizer_training_rows_do_not_depend_on_the_hash_seed():
    """The same rows in every process: the recognizer trained on each machine is the same."""
    import subprocess
    import sys

    code = ("import hashlib, json; from tuneloop.data import pii_model; "
            "print(hashlib.sha256(json.dumps(pii_model.training_rows()).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(digests) == 1 and len(digests.pop()) == 65  # 64 hex digits and a newline


def test_the_data_report_counts_entities_per_type_for_bio_rows(workspace):
    rows = [{"tokens": ["Ann", "Lee", "in", "Paris", "and", "Rome"],
             "tags": ["B-person", "I-person", "O", "B-location", "O", "B-location"]},
            {"tokens": ["lol", "ok"], "tags": ["O", "O"]}]
    rows = [{"tokens": r["tokens"] + [str(i)], "tags": r["tags"] + ["O"]}
            for i in range(10) for r in rows]
    version = prepare(rows, recipe(task="extract", anonymize={"enabled": False},
                                   dedup={"near": {"enabled": False}},
                                   split={"test": 0, "validation": 0}))
    train = version.report["splits"]["train"]
    assert train["rows"] == 20 and train["empty_rows"] == 10
    assert train["entities"] == {"location": 20, "person": 10}
    first = read(Path(version.folder) / "train.jsonl")[0]  # prepared as text with its fields
    assert "tags" not in first and first["text"].startswith(("Ann Lee in Paris", "lol ok"))
    from tuneloop.data.report import render_html
    assert "nothing to extract" in render_html(version.report)
