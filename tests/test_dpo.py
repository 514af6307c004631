"""DPO: preference rows, per-sequence log-probabilities, the loss at the start point, and a
tiny model that learns to prefer the chosen replies."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import WORDS, write_jsonl
from tuneloop.core.batching import collate
from tuneloop.core.formats import load_examples, prompt_messages, scan
from tuneloop.core.tokenize import IGNORE, encode
from tuneloop.evaluate import evaluate
from tuneloop.project import recipe_from_dict
from tuneloop.models.scoring import dpo_loss
from tuneloop.models.scoring import sequence_logps
from tuneloop.train.run import train


def pairs(n: int, seed: int) -> list[dict]:
    """Chosen replies are polite ("glad to help: ..."), rejected ones rude ("go away: ...")."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.sample(WORDS, 2))
        rows.append({"prompt": f"Human: please help with {words} {i}\n\nAssistant:",
                     "chosen": f"glad to help: {words}", "rejected": f"go away: {words}"})
    return rows


def test_preference_rows_are_read_with_clear_errors(tmp_path):
    assert prompt_messages("Human: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]
    assert prompt_messages("plain question") == [{"role": "user", "content": "plain question"}]
    path = write_jsonl(tmp_path / "p.jsonl", pairs(10, 0) + [
        {"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": 5, "chosen": "a", "rejected": "b"}])
    report = scan(path)
    assert [(p.line, p.code) for p in report.problems] == [
        (11, "missing_preference"), (12, "identical_pair"), (13, "invalid_prompt")]
    first = load_examples(write_jsonl(tmp_path / "ok.jsonl", pairs(10, 0)))[0]
    assert first.answer.startswith("glad") and first.rejected.startswith("go away")


def test_sequence_logps_sum_the_answer_tokens_of_each_row(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = [encode(tok, [{"role": "user", "content": "hello there"}], "a short answer"),
            encode(tok, [{"role": "user", "content": "hi"}], "another, longer answer here")]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, batch)
        for row, enc in enumerate(rows):
            ids = torch.tensor([enc.input_ids])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            labels = torch.tensor(enc.labels[1:])
            want = sum(logp[i, t] for i, t in enumerate(labels.tolist()) if t != IGNORE)
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-4)


def test_dpo_loss_is_log2_at_the_start_and_falls_as_the_margin_grows():
    ref = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]])
    torch.testing.assert_close(dpo_loss(ref, ref, 0.1), torch.full((2,), 0.6931), rtol=0, atol=1e-4)
    better = ref + torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert (dpo_loss(better, ref, 0.1) < 0.6931).all()


def test_dpo_makes_a_tiny_model_prefer_the_chosen_replies(tiny_model, tmp_path, workspace):
    train_file = write_jsonl(tmp_path / "train.jsonl", pairs(40, 1))
    test_file = write_jsonl(tmp_path / "test.jsonl", pairs(12, 2))
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "chat", "method": "dpo",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 6, "learning_rate": 5e-3, "batch_size": 4, "batch_tokens": 512,
                               "dpo": {"beta": 0.5}})
    base = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}
    result = train(recipe, workspace=workspace)
    assert result["method"] == "dpo" and "gate" not in result  # no prompting baselines for DPO
    assert result["test"]["preference_accuracy"] > result["test"]["start_preference_accuracy"]
    assert result["test"]["reward_accuracy"] > 0.5 and result["test"]["dpo_loss"] < 0.6931
    again = evaluate(result["run_id"], test_file, workspace=workspace)  # the saved adapter
    assert again["preference_accuracy"] == result["test"]["preference_accuracy"]
    from tests.test_cli import tl

    listed = tl("runs", "list")  # a DPO run's headline is its preference accuracy
    assert f"{result['test']['preference_accuracy']:.3f}" in listed.stdout
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(untouched[k], v) for k, v in base.items())

    # Continuing a finished run: the reference is that run's adapter, not the base.
    follow = recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"start": result["run_id"]}),
                                       "epochs": 1})
    second = train(follow, workspace=workspace)
    assert second["test"]["start_preference_accuracy"] == pytest.approx(
        result["test"]["preference_accuracy"])
    rescored = evaluate(second["run_id"], test_file, workspace=workspace)  # same reference
    assert rescored["start_preference_accuracy"] == second["test"]["start_preference_accuracy"]
    assert rescored["dpo_loss"] == pytest.approx(second["test"]["dpo_loss"])
