"""Every validation code, on files written in the test; the canonical example of each format."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_rows, write_jsonl
from tuneloop.core.formats import Example, load_examples, scan
from tuneloop.errors import TuneloopError

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def codes(path, **kw) -> dict[str, list[int]]:
    report = scan(path, **kw)
    out: dict[str, list[int]] = {}
    for p in report.problems:
        out.setdefault(p.code, []).append(p.line)
    return out


@pytest.mark.parametrize("row, code", [
    ("[1, 2]", "data_type"),
    ({"msgs": []}, "missing_messages_list"),
    ({"messages": "hello"}, "missing_messages_list"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "message_missing_key"),
    ({"messages": [{"role": "user", "content": "x", "mood": 1},
                   {"role": "assistant", "content": "y"}]}, "message_unrecognized_key"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unrecognized_role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
     "missing_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message"),
    ({"prompt": "x", "completion": ""}, "missing_content"),
    ('{"text": "broken', "invalid_json"),
    ({"text": "no label here"}, "missing_label"),
    ({"text": "x", "fields": []}, "missing_fields"),
    ({"text": "x", "fields": {"when": {"day": 1}}}, "bad_field_value"),
    ({"text": "x", "fields": {"who": ["Ann", ["Bob"]]}}, "bad_field_value"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, "bad_bio"),
    ({"tokens": ["a"], "tags": ["X-person"]}, "bad_bio"),
])
def test_each_code_names_the_line(tmp_path, row, code):
    rows = [GOOD_CHAT] * 12
    rows.insert(5, row)
    found = codes(write_jsonl(tmp_path / "d.jsonl", rows))
    assert found == {code: [6]}


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    assert codes(tmp_path / "e.jsonl") == {"empty_file": [0]}
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    assert codes(tmp_path / "blank.jsonl") == {"empty_file": [0]}


def test_binary_file_gets_one_clear_answer(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(bytes(range(256)) * 100)
    report = scan(tmp_path / "b.jsonl")
    assert [p.code for p in report.problems] == ["not_utf8"]
    assert "binary" in report.problems[0].message


def test_not_utf8_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT] * 12)
    path.write_bytes(path.read_bytes() + b'{"text": "caf\xe9", "label": "x"}\n')
    assert codes(path) == {"not_utf8": [13]}


def test_too_few_examples(tmp_path):
    assert codes(write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT] * 3)) == {"too_few_examples": [0]}


def test_too_long_uses_the_token_count(tmp_path):
    rows = [GOOD_CHAT] * 11 + [{"text": "word " * 200, "label": "a"}]
    found = codes(write_jsonl(tmp_path / "d.jsonl", rows),
                  count_tokens=lambda e: len(e.messages[0]["content"].split()), max_tokens=100)
    assert found == {"too_long": [12]}


def test_oversized_line_is_skipped_without_reading_it_whole(tmp_path, monkeypatch):
    import tuneloop.core.formats as formats

    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x" * 5000, "label": "a"}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in make_rows(12)))
    report = scan(path)
    assert report.counts == {"line_too_large": 1}
    assert report.valid == 12


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    rows = ["not json"] * 3 + [GOOD_CHAT] * 10 + ["[]"]
    found = codes(write_jsonl(tmp_path / "d.jsonl", rows))
    assert found == {"invalid_json": [1, 2, 3], "data_type": [14]}


def test_formats_become_one_example_type(tmp_path):
    rows = [GOOD_CHAT, {"prompt": "p", "completion": "c"}, {"text": "t", "label": "l"},
            {"text": "t2", "fields": {"a": "1"}}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = load_examples(path)
    assert all(isinstance(e, Example) for e in examples)
    assert [e.answer for e in examples] == ["yo", "c", "l", '{"a": "1"}']
    assert examples[2].label == "l" and examples[3].fields == {"a": "1"}
    assert examples[1].messages == ({"role": "user", "content": "p"},)
    assert [e.line for e in examples] == [1, 2, 3, 4]


def test_load_examples_raises_a_user_error_listing_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT] * 10 + ["oops"])
    with pytest.raises(TuneloopError, match="line 11: invalid_json"):
        load_examples(path)


def test_memory_stays_flat_on_large_files(tmp_path):
    """A 200 MB file with no newline and 40 MB of rows are read in bounded memory."""
    import subprocess
    import sys

    huge = tmp_path / "one_line.jsonl"
    with huge.open("wb") as f:
        block = b"a" * (1 << 20)
        for _ in range(200):
            f.write(block)
    many = tmp_path / "many.jsonl"
    row = (json.dumps({"text": "x" * 150, "label": "a"}) + "\n").encode()
    many.write_bytes(row * (40_000_000 // len(row)))
    script = (
        "import resource, sys, json\n"
        "from tuneloop.core.formats import scan\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r1 = scan(sys.argv[1]); r2 = scan(sys.argv[2])\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(json.dumps({'codes': r1.counts, 'valid': r2.valid, 'grew_mb': grew}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(huge), str(many)],
                          capture_output=True, text=True, check=True, timeout=300)
    out = json.loads(proc.stdout)
    assert out["codes"] == {"line_too_large": 1, "too_few_examples": 1}
    assert out["valid"] == 40_000_000 // len(row)
    assert out["grew_mb"] < 64, out


def test_rows_with_nothing_to_extract_are_valid_and_all_empty_is_warned(tmp_path):
    rows = [{"text": f"price range {i}?", "fields": {}} for i in range(11)]
    report = scan(write_jsonl(tmp_path / "e.jsonl", rows), task="extract")
    assert report.ok and report.valid == 11
    assert [w.code for w in report.warnings] == ["nothing_to_extract"]
    rows.append({"text": "two people: Ann and Bob", "fields": {"people": ["Ann", "Bob"]}})
    report = scan(write_jsonl(tmp_path / "f.jsonl", rows), task="extract")
    assert report.ok and report.valid == 12 and report.warnings == []


def test_bio_rows_become_extraction_rows_with_lists_of_spans(tmp_path):
    rows = [{"tokens": ["Will", "Shawn", "Mendez", "meet", "taylor", "swift", "in", "Paris", "?"],
             "tags": ["O", "B-person", "I-person", "O", "B-person", "I-person", "O",
                      "B-location", "O"]},
            {"tokens": ["lol", "ok"], "tags": ["O", "O"]},
            {"tokens": ["x", "Ann", "Bo"], "tags": ["O", "I-person", "B-person"]}]  # stray I-
    first, empty, stray = load_examples(write_jsonl(tmp_path / "b.jsonl", rows), "extract")
    assert first.fields == {"person": ["Shawn Mendez", "taylor swift"], "location": ["Paris"]}
    assert first.messages[0]["content"] == "Will Shawn Mendez meet taylor swift in Paris ?"
    assert empty.fields == {} and stray.fields == {"person": ["Ann", "Bo"]}
