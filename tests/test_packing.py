"""Packed micro-batches: examples end to end in a row, each attending only to itself.

A packed batch must give every example exactly what it gets alone: its per-token losses, its
gradients, its logits (whatever its neighbours hold), and a run packed must train as one padded.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import write_jsonl
from tuneloop.core.batching import collate, pack, update_batches
from tuneloop.core.tokenize import IGNORE, Encoded
from tuneloop.errors import TuneloopError
from tuneloop.models import scoring
from tuneloop.models.scoring import sequence_logps
from tuneloop.project import recipe_from_dict


def examples(n: int, seed: int = 0, vocab: int = 300) -> list[Encoded]:
    """Prompt tokens (no loss) then answer tokens, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt, answer = (int(x) for x in torch.randint(2, 12, (2,), generator=g))
        ids = torch.randint(3, vocab, (prompt + answer,), generator=g).tolist()
        items.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return items


def model_with(tiny_model, attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn,
                                                dtype=torch.float32)


def token_losses(model, batch) -> torch.Tensor:
    return scoring.token_losses(model, batch)[0]


def test_a_packed_row_restarts_positions_and_keeps_the_examples_apart():
    items = examples(5)
    batch = pack(items, pad_id=0, row_tokens=40)
    total = sum(len(x) for x in items)
    assert int(batch["attention_mask"].sum()) == total
    assert batch["input_ids"].shape[0] < len(items)  # several examples share a row
    for i, item in enumerate(items):
        where = batch["sequence"] == i
        assert int(where.sum()) == len(item)
        r = int(where.nonzero()[0, 0])
        cols = where[r].nonzero().flatten()
        assert batch["position_ids"][r, cols].tolist() == list(range(len(item)))
        assert batch["input_ids"][r, cols].tolist() == item.input_ids
        labels = batch["labels"][r, cols].tolist()
        assert labels[0] == IGNORE and labels[1:] == item.labels[1:]
    assert all(int(u) <= 40 for u in batch["attention_mask"].sum(1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_each_example_alone(tiny_model, attn):
    model = model_with(tiny_model, attn)
    items = examples(6, seed=1)
    packed = pack(items, pad_id=0, row_tokens=48)
    # The packed batch's answer tokens, in its row-major order, by the item they belong to.
    _, _, keep = scoring.token_losses(model, packed)
    owner = packed["sequence"][:, 1:][keep]
    losses = token_losses(model, packed)
    alone_grads = None
    for i, item in enumerate(items):
        alone = token_losses(model, collate([item], 0))
        assert torch.allclose(losses[owner == i], alone, atol=1e-5)
        model.zero_grad()
        alone.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        alone_grads = grads if alone_grads is None else [a + g for a, g in zip(alone_grads, grads)]
    model.zero_grad()
    token_losses(model, packed).sum().backward()
    for p, expected in zip(model.parameters(), alone_grads):
        assert torch.allclose(p.grad, expected, atol=1e-5)


def test_no_token_attends_across_an_example_boundary(tiny_model):
    model = model_with(tiny_model, "sdpa")
    items = examples(4, seed=2)
    before = token_losses(model, pack(items, 0, row_tokens=200))
    changed = list(items)
    x = items[1]
    changed[1] = Encoded([(t * 7 + 1) % 290 + 3 for t in x.input_ids], x.labels)  # other tokens
    batch = pack(changed, 0, row_tokens=200)
    assert batch["input_ids"].shape[0] == 1  # all four in one row
    after = token_losses(model, batch)
    _, _, keep = scoring.token_losses(model, batch)
    owner = batch["sequence"][:, 1:][keep]
    others = owner != 1
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[~others], after[~others])


def test_packed_sequence_logps_equal_padded_rows(tiny_model):
    model = model_with(tiny_model, "sdpa")
    items = examples(7, seed=3)
    padded = sequence_logps(model, collate(items, 0))
    packed = sequence_logps(model, pack(items, 0, row_tokens=64))
    assert packed.shape == (7,)
    assert torch.allclose(packed, padded, atol=1e-5)


def test_the_distillation_loss_of_a_packed_batch_is_the_sum_of_each_example_alone(tiny_model):
    from tuneloop.train.distill import distill_loss

    student, teacher = model_with(tiny_model, "sdpa"), model_with(tiny_model, "sdpa")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = examples(5, seed=5)
    kw = dict(teacher=teacher, top_k=4, temperature=2.0, weight=0.5)
    packed, n = distill_loss(student, pack(items, 0, row_tokens=64), **kw)
    alone = [distill_loss(student, collate([x], 0), **kw) for x in items]
    assert n == sum(k for _, k in alone)
    assert torch.allclose(packed, sum(loss for loss, _ in alone), atol=1e-4)


def test_packed_micro_batches_hold_the_same_updates_within_the_token_budget():
    lengths = [len(x) for x in examples(64, seed=4)]
    padded = update_batches(lengths, 16, 48, seed=0)
    packed = update_batches(lengths, 16, 48, seed=0, packed=True)
    assert [sorted(sum(u, [])) for u in padded] == [sorted(sum(u, [])) for u in packed]
    for update in packed:
        for micro in update:
            assert len(micro) == 1 or sum(lengths[i] for i in micro) <= 48
    # One long example among short ones: padded rows pay its length in every row beside it.
    mixed = [40] + [4] * 63
    assert len(update_batches(mixed, 64, 160, seed=0)[0]) == 3
    assert len(update_batches(mixed, 64, 160, seed=0, packed=True)[0]) == 2


@pytest.mark.parametrize("task", ["classify", "head", "dpo"])
def test_a_packed_run_trains_as_a_padded_run(tiny_model, classify_files, tmp_path, task):
    from tuneloop.data.splits import load_splits
    from tuneloop.train.dpo import run_dpo
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    spec = {"base_model": str(tiny_model), "task": "classify", "method": "lora", "head": "none",
            "data": {"train": str(train_file), "test": str(test_file)}, "max_steps": 4,
            "learning_rate": 5e-3, "batch_size": 8, "batch_tokens": 256, "eval_every": 2}
    if task == "head":  # the label head, as classification trains by default
        spec.update(head="labels")
    if task == "dpo":
        rows = [{"prompt": f"q{i} {r['text']}", "chosen": r["label"], "rejected": "no idea"}
                for i, r in enumerate(json.loads(x) for x in train_file.read_text().splitlines())]
        spec.update(task="chat", method="dpo", data={"train": str(write_jsonl(
            tmp_path / "pairs.jsonl", rows))})
    curves, plans = {}, {}
    for packing in ("on", "off"):
        recipe = recipe_from_dict({**spec, "packing": packing})
        splits = load_splits(recipe.data, recipe.task, recipe.method)
        run = run_dpo if task == "dpo" else run_lora
        out = run(recipe, splits, tmp_path / packing)
        curves[packing] = json.loads((tmp_path / packing / "curves.json").read_text())
        plans[packing] = out["plan"]
    assert plans["on"].packing and not plans["off"].packing
    for kind in ("train", "validation"):
        on, off = curves["on"][kind], curves["off"][kind]
        assert [s for s, _ in on] == [s for s, _ in off] and on
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(on, off)), (on, off)


def test_packing_on_with_the_label_set_loss_is_a_clear_error(tiny_model, classify_files, tmp_path):
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "classify",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "max_steps": 1, "loss": "labels", "packing": "on"})
    with pytest.raises(TuneloopError, match="packing: off"):
        run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


def test_compile_trains_as_eager_and_only_the_training_step_is_compiled(
        tiny_model, classify_files, tmp_path, monkeypatch):
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    compiled = []
    real = torch.compile

    def compile_without_codegen(module, **kw):  # PyTorch's compiler, without C++ codegen
        compiled.append(module)
        return real(module, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    train_file, test_file = classify_files
    spec = {"base_model": str(tiny_model), "task": "classify", "max_steps": 4,
            "data": {"train": str(train_file), "test": str(test_file)}, "learning_rate": 5e-3,
            "batch_size": 8, "batch_tokens": 256, "eval_every": 2, "packing": "on",
            "head": "none"}  # (compile rules out a head; the eager run trains the same loss)
    curves, stats = {}, {}
    for mode in (True, False):
        recipe = recipe_from_dict({**spec, "compile": mode})
        out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / str(mode))
        curves[mode] = json.loads((tmp_path / str(mode) / "curves.json").read_text())
        stats[mode] = out["stats"]
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "LlamaModel"  # the body, once
    for kind in ("train", "validation"):
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(curves[True][kind],
                                                               curves[False][kind]))
    assert stats[True]["steady_tokens_per_s"] > 0 and stats[True]["warmup_s"] > 0
    with pytest.raises(TuneloopError, match="leave out compile"):
        recipe_from_dict({**spec, "compile": True, "method": "dpo", "task": "chat"})
