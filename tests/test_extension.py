"""docs/layout.md, "Adding a method" and "Adding a task", done from the test: a toy task and a
toy on-policy method are registered in the places the guide names (`tasks.TASKS`,
`methods.METHODS`, `train.methods.TRAINERS`) and nowhere else, then run through the recipe,
training, the test set and the gate, `evaluate`, the run report and the served API."""

from __future__ import annotations

import json
import types

import openai
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tuneloop import methods, tasks
from tuneloop.core.tokenize import encode
from tuneloop.methods import LORA_LR, Method
from tuneloop.project import recipe_from_dict
from tuneloop.tasks import chat
from tuneloop.tasks.info import TaskInfo
from tuneloop.train import lora
from tuneloop.train import methods as train_methods
from tuneloop.train.objective import Objective
from tuneloop.train.sft import Weights, run_sft

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]


def first_word(text: str) -> str:
    return (text.split() or [""])[0].strip(".,").lower()


def toy_task():
    """"first-word": answer with the first word of the message. Everything chat's module
    answers is reused; what makes the task its own is overridden, so the stages must ask it."""
    members = {k: getattr(chat, k) for k in dir(chat) if not k.startswith("_")}

    def metrics(predictions, golds, valid, examples=None):
        hits = [first_word(p) == g for p, g in zip(predictions, golds)]
        return {"first_word_accuracy": sum(hits) / len(hits) if hits else 0.0, "n": len(hits)}

    return types.SimpleNamespace(**{
        **members,
        "HEADLINE": "first_word_accuracy", "ROW_HEADLINE": "first_word_accuracy",
        "COLUMNS": ["first_word_accuracy"], "REFERENCE_LOSS": False,
        "describe": lambda examples, fields=None: TaskInfo("first-word"),
        "gold": lambda example, info: example.answer,
        "metrics": metrics,
        "row_score": lambda row: float(first_word(row["prediction"] or "") == row["gold"]),
        "max_new_tokens": lambda tokenizer, examples, info: 4,
    })


class SelfTaught(Objective):
    """A toy on-policy objective: at each update the model, as it is then, answers the step's
    prompts; a sampled answer that is right is learned, else the gold one. The run has as many
    updates as `schedule` says, whatever the data's size."""

    updates = 3

    def __init__(self):
        super().__init__()
        self.sampled: list[int] = []  # replies generated at each update

    def encode(self, tokenizer, module, info, examples):
        self.tokenizer, self.module, self.info = tokenizer, module, info
        return [(e, encode(tokenizer, module.prompt(e, info), module.target(e, info)))
                for e in examples]

    def size(self, item) -> int:
        return len(item[1])

    def schedule(self, lengths, epochs, batch_size, batch_tokens, seed, parts=1, packed=False):
        self.items = len(lengths)
        every = list(range(len(lengths)))
        return [[every[i::2] for i in range(2)] for _ in range(self.updates)]

    def step_batches(self, model, update, items, pad):
        from tuneloop.models.generate import generate

        batches = []
        for micro in update:
            examples = [items[i][0] for i in micro]
            prompts = [self.module.prompt(e, self.info) for e in examples]
            was_training = model.training
            model.eval()
            with torch.no_grad():
                replies, _ = generate(model, self.tokenizer, prompts, max_new_tokens=3)
            model.train(was_training)
            self.sampled.append(len(replies))
            answers = [r if first_word(r) == e.answer else e.answer
                       for r, e in zip(replies, examples)]
            batches.append(self.collate([encode(self.tokenizer, p, a)
                                         for p, a in zip(prompts, answers)], pad))
        return batches

    def batches(self, items, pad, batch_tokens):
        return super().batches([enc for _, enc in items], pad, batch_tokens)


@pytest.fixture()
def registered(monkeypatch):
    """The toy task and method, each in the registries docs/layout.md names, for this test."""
    objective = SelfTaught()
    weights = Weights("self-taught", lora.load_base, lora.prepare, lora.save_adapter)

    def train(recipe, splits, run_dir, ctx):
        return run_sft(weights, recipe, splits, run_dir, ctx.progress, resume=ctx.resume,
                       on_validation=ctx.on_validation, objective=objective)

    monkeypatch.setitem(tasks.TASKS, "first-word", toy_task())
    monkeypatch.setitem(methods.METHODS, "self-taught",
                        Method("self-taught", "samples its answers while it trains", LORA_LR,
                               one_process="its samples come from one model"))
    monkeypatch.setitem(train_methods.TRAINERS, "self-taught", train_methods.Trainer(train))
    return objective


def rows(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        word = WORDS[(i * 7 + seed) % len(WORDS)]
        out.append({"messages": [{"role": "user", "content": f"{word} is what i said {i}"},
                                 {"role": "assistant", "content": word}]})
    return out


def test_a_toy_method_and_task_run_through_train_eval_and_serving(registered, tiny_model,
                                                                    tmp_path, workspace):
    from tuneloop.evaluate import evaluate, run_report
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    train_file = write_jsonl(tmp_path / "train.jsonl", rows(24, 0))
    test_file = write_jsonl(tmp_path / "test.jsonl", rows(6, 3))
    recipe = recipe_from_dict({
        "base_model": str(tiny_model), "task": "first-word", "method": "self-taught",
        "data": {"train": str(train_file), "test": str(test_file)}, "learning_rate": 5e-3,
        "baselines": ["zero-shot"], "forgetting": {"enabled": False}, "batch_tokens": 512})
    one = r"method self-taught trains in one process \(its samples come from one model\)"
    with pytest.raises(Exception, match=one):
        train(recipe, workspace=workspace, processes=2)

    result = train(recipe, workspace=workspace)

    # The objective made every update's batches during training, with the model as it was.
    assert result["steps"] == SelfTaught.updates and len(registered.sampled) == 2 * 3
    assert sum(registered.sampled) == 3 * registered.items > 0
    run_dir = workspace / "runs" / result["run_id"]
    meta = json.loads((run_dir / "adapter" / "tuneloop.json").read_text())
    assert meta["method"] == "self-taught" and meta["task"]["kind"] == "first-word"
    lora_b = [v for k, v in load_file(run_dir / "adapter" / "adapter_model.safetensors").items()
              if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapters trained
    # The test set, the baseline and the gate use the task's own headline.
    assert 0.0 <= result["first_word_accuracy"] <= 1.0 and result["test"]["n"] == 6
    assert result["gate"]["metric"] == "first_word_accuracy"
    assert "first_word_accuracy" in result["baselines"]["zero-shot"]
    assert "first_word_accuracy" in run_report.report_data(result["run_id"],
                                                           Registry.open(workspace), workspace)[
        "scoreboard"][0]

    ev = evaluate(result["run_id"], test_file, workspace=workspace)
    assert ev["task"] == "first-word" and ev["first_word_accuracy"] == result["first_word_accuracy"]

    registry = Registry.open(workspace)
    deploy(registry, "toy", result["run_id"], "acme", force=True)
    secret = create_key(registry, "acme", bases=[str(tiny_model)])[1]
    with running(Settings(workspace=workspace, bases=[str(tiny_model)])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        test_rows = [json.loads(line) for line in test_file.read_text().splitlines()]
        predictions = [json.loads(line) for line in
                       open(ev["predictions"], encoding="utf-8")]
        for row, predicted in zip(test_rows[:2], predictions):
            reply = client.chat.completions.create(
                model="toy", messages=row["messages"][:1], temperature=0, max_tokens=4)
            assert reply.choices[0].message.content.strip() == predicted["output"].strip()


def test_a_recipe_names_only_registered_methods_and_tasks():
    base = {"task": "chat", "data": {"train": "x.jsonl"}}
    with pytest.raises(Exception, match="method: Input should be 'lora'"):
        recipe_from_dict({**base, "method": "self-taught"})
    with pytest.raises(Exception, match="task: Input should be 'classify'"):
        recipe_from_dict({**base, "task": "first-word"})
    assert set(methods.METHODS) == set(train_methods.TRAINERS)  # one trainer per entry
