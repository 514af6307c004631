"""Classification held to its label set, on the tiny model: every label gets a probability (the
label trie's, checked against each label scored alone), the probabilities sum to one, the
prediction is always a label even where free generation is not, the serving engine's constrained
reply is a label with the same probability, and calibration is measured. Also: the plan counts
updates in examples, so CPU- and GPU-sized micro-batches give a run the same updates."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import LABELS, make_rows
from tuneloop.core.formats import Example
from tuneloop.core.tokenize import prompt_ids
from tuneloop.evaluate.runner import calibration, score
from tuneloop.serve.engine import Engine, Sampling, complete
from tuneloop.tasks import classify
from tuneloop.tasks.labels import LabelTrie, label_distribution
from tuneloop.tasks import TaskInfo
from tuneloop.tasks.info import SAVED_WITHOUT_SYSTEM
from tuneloop.train.objective import schedule

# Labels sharing first tokens and one label that is a prefix of another: the trie branches
# below its root and ends one label where another goes on.
MANY = LABELS + ["card_lost_again", "card_arrival", "top", "exchange"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def alone(model, tok, prompt: list[int], labels: list[str]) -> torch.Tensor:
    """Reference: each label's tokens scored one at a time on the unpadded prompt, with the
    probability renormalized over the tokens that continue some label at every step."""
    seqs = [tok(l, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for l in labels]
    out = []
    for seq in seqs:
        logits = model(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:].double()
        logp = 0.0
        for k, token in enumerate(seq):
            allowed = sorted({s[k] for s in seqs if s[:k] == seq[:k] and len(s) > k})
            share = torch.log_softmax(logits[k, allowed], -1)
            logp += float(share[allowed.index(token)])
        out.append(logp)
    return torch.tensor(out, dtype=torch.float64).exp()


def test_label_probabilities_equal_each_label_scored_alone_and_sum_to_one(tiny):
    model, tok = tiny
    trie = LabelTrie(tok, MANY)
    assert len(trie.branching) > 1  # branches below the root too
    prompts = [prompt_ids(tok, classify.prompt(Example(messages=({"role": "user", "content": r["text"]},), answer=""), None))
               for r in make_rows(7, seed=4)]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    probs = label_distribution(model, tok, trie, prompts, batch_size=3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(prompts), dtype=torch.float64))
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(probs[row], alone(model, tok, prompt, MANY), atol=1e-5, rtol=1e-4)


def test_predictions_are_always_labels_where_free_generation_is_not(tiny):
    model, tok = tiny
    info = TaskInfo(kind="classify", labels=tuple(MANY))
    examples = [Example(messages=({"role": "user", "content": r["text"]},), answer=r["label"],
                        label=r["label"], line=i + 1)
                for i, r in enumerate(make_rows(9, seed=5))]
    # the untrained model, generating freely, names no label
    free = model.generate(torch.tensor([prompt_ids(tok, classify.prompt(examples[0], info))]),
                          max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(free[0], skip_special_tokens=True).split("assistant")[-1].strip() not in MANY
    result = score(model, tok, examples, info)
    rows = result["predictions"]
    assert all(r["prediction"] in MANY and r["output"] in MANY for r in rows)
    assert result["metrics"]["exact_label_rate"] == 1.0
    assert all(0.0 < r["confidence"] <= 1.0 for r in rows)
    calib = result["metrics"]["calibration"]
    assert sum(b["n"] for b in calib["bins"]) == len(rows) and 0.0 <= calib["ece"] <= 1.0


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    honest = calibration([0.75] * 4, [True, True, True, False])
    assert honest["ece"] == pytest.approx(0.0) and honest["bins"][0]["accuracy"] == 0.75
    overconfident = calibration([0.95] * 4, [True, False, False, False])
    assert overconfident["ece"] == pytest.approx(0.70)
    assert calibration([1.0], [True])["bins"][-1]["high"] == 1.0  # a confidence of 1 is binned


def test_the_engine_constrained_to_labels_replies_a_label_with_its_probability(tiny):
    model, tok = tiny
    trie = LabelTrie(tok, MANY)
    engine = Engine(model, tok)
    try:
        for r in make_rows(4, seed=6):
            prompt = prompt_ids(tok, classify.prompt(Example(messages=({"role": "user", "content": r["text"]},), answer=""), None))
            choice = complete(engine, prompt, Sampling(max_tokens=32, temperature=0, grammar=trie))[0]
            assert choice.text in MANY and choice.finish_reason == "stop"
            probs = label_distribution(model, tok, trie, [prompt])[0]
            assert choice.confidence == pytest.approx(float(probs[MANY.index(choice.text)]), rel=1e-4)
    finally:
        engine.close()


def test_cpu_and_gpu_micro_batches_give_the_same_updates():
    """The same data, seed and batch size: a 768-token (CPU) and an 8192-token (GPU) micro-batch
    budget make as many updates, each over the same examples; only the split differs."""
    lengths = [20 + (i * 37) % 90 for i in range(1000)]
    cpu = schedule(lengths, 2.0, 16, 768, seed=3)
    gpu = schedule(lengths, 2.0, 16, 8192, seed=3)
    assert len(cpu) == len(gpu) == 2 * 63  # ceil(1000 / 16) updates per epoch
    for a, b in zip(cpu, gpu):
        assert sorted(i for m in a for i in m) == sorted(i for m in b for i in m)
        assert all(max(lengths[i] for i in m) * len(m) <= 768 for m in a)
    assert sum(len(u) for u in cpu) > sum(len(u) for u in gpu)  # CPU: more, smaller passes
    seen = sorted(i for u in cpu[:63] for m in u for i in m)
    assert seen == list(range(1000))  # an epoch sees every example once


def test_extraction_is_decoded_under_its_fields_schema_where_free_generation_breaks(tiny):
    """The untrained tiny model writes no JSON of its own; scored as an extractor (a fine-tune
    or a prompting baseline), every answer parses as one object with exactly the task's
    fields, in order."""
    import json

    model, tok = tiny
    fields = ("name", "city")
    info = TaskInfo(kind="extract", fields=fields)
    examples = [Example(messages=({"role": "user", "content": r["text"]},), answer="",
                        fields={"name": "ann", "city": "rome"}, line=i + 1)
                for i, r in enumerate(make_rows(4, seed=7))]
    from tuneloop.tasks import extract

    prompt = prompt_ids(tok, extract.prompt(examples[0], info))
    free = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):]
    assert extract.parse(tok.decode(free, skip_special_tokens=True), info)[1] is False
    # as a fine-tune is scored, and as the gate's baselines are (zero-shot, and shots
    # sharing a prefix, with and without its cache)
    for kwargs in ({}, {"shots": []}, {"shots": examples[:2]},
                   {"shots": examples[:2], "reuse_prefix": False}):
        result = score(model, tok, examples, info, zero_shot="shots" in kwargs, **kwargs)
        assert result["metrics"]["json_valid_rate"] == 1.0, kwargs
        for row in result["predictions"]:
            assert list(json.loads(row["output"])) == list(fields)


def test_a_shared_prefix_run_once_scores_labels_as_the_whole_prompts_do(tiny):
    """Few- and many-shot prompts share their instruction and shots: run once and copied into
    every batch, that prefix gives the label probabilities of the whole prompts."""
    model, tok = tiny
    trie = LabelTrie(tok, MANY)
    prefix = prompt_ids(tok, [{"role": "system", "content": "labels: " + " ".join(MANY)},
                              {"role": "user", "content": "i lost my card"},
                              {"role": "assistant", "content": "card_lost"}])
    suffixes = [tok(f"<|im_start|>user\n{r['text']}<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False)["input_ids"] for r in make_rows(5, seed=8)]
    shared = label_distribution(model, tok, trie, suffixes, batch_size=2, prefix=prefix)
    whole = label_distribution(model, tok, trie, [prefix + s for s in suffixes], batch_size=2)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-4)


def test_a_classifier_is_prompted_as_it_was_trained_old_artifacts_too():
    """New classifiers learn with the short system turn and record it with their artifact; one
    saved before that record existed learned with the instruction, and is prompted with it."""
    ask = Example(messages=({"role": "user", "content": "hi"},), answer="")
    info = classify.describe([Example(ask.messages, "b", label="b"),
                              Example(ask.messages, "a", label="a")])
    assert info == TaskInfo(kind="classify", labels=("a", "b"), system=classify.TRAINED_SYSTEM)
    saved = info.to_dict()
    assert saved["system"] == classify.TRAINED_SYSTEM
    assert SAVED_WITHOUT_SYSTEM["classify"] == classify.SYSTEM
    assert classify.prompt(ask, TaskInfo.from_dict(saved))[0]["content"] == "Classify."
    legacy = {k: v for k, v in saved.items() if k != "system"}
    assert classify.prompt(ask, TaskInfo.from_dict(legacy))[0]["content"] == classify.SYSTEM
    assert "Labels: a, b." in classify.prompt(ask, info, zero_shot=True)[0]["content"]


def test_label_probabilities_hold_on_a_sliding_window_model(tiny_model):
    """Gemma 3's sliding layers see only the last positions: the trie's tree pass masks them
    alike, so prompts longer than the window still score as each label alone."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        pad_token_id=tok.pad_token_id)).eval()
    trie = LabelTrie(tok, MANY)
    prompts = [prompt_ids(tok, classify.prompt(Example(messages=({"role": "user", "content": r["text"]},), answer=""), None))
               for r in make_rows(4, seed=9)]
    assert min(len(p) for p in prompts) > 6  # longer than the window
    probs = label_distribution(model, tok, trie, prompts, batch_size=2)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(probs[row], alone(model, tok, prompt, MANY), atol=1e-5, rtol=1e-4)


def test_an_update_split_for_several_processes_stays_within_the_token_budget():
    """Four processes need four micro-batches; an update the budget cuts in two is halved
    further, never re-dealt into micro-batches over the budget."""
    lengths = [4000] + [100] * 15
    (update,) = schedule(lengths, 1.0, 16, 8192, seed=0, parts=4)
    assert len(update) >= 4 and sorted(i for m in update for i in m) == list(range(16))
    assert all(max(lengths[i] for i in m) * len(m) <= 8192 for m in update)


def test_the_label_loss_is_minus_log_the_gold_labels_probability(tiny):
    """The label loss of a padded batch is, row by row, -log of the gold label's probability as
    eval and serving compute it; a label set with one label leaves nothing to learn."""
    from tuneloop.core.batching import collate
    from tuneloop.core.tokenize import encode
    from tuneloop.tasks.labels import label_loss

    model, tok = tiny
    trie = LabelTrie(tok, MANY)
    rows = make_rows(6, seed=2)
    golds = [MANY[(3 * i) % len(MANY)] for i in range(len(rows))] + ["card_lost_again"]
    messages = [classify.prompt(Example(messages=({"role": "user", "content": r["text"]},),
                                        answer=""), None) for r in rows + rows[:1]]
    encoded = [encode(tok, m, g) for m, g in zip(messages, golds)]
    assert len({len(e) for e in encoded}) > 1  # padding is exercised
    summed, n = label_loss(trie)(model, collate(encoded, tok.pad_token_id))
    probs = label_distribution(model, tok, trie, [prompt_ids(tok, m) for m in messages])
    expected = -sum(torch.log(probs[i, MANY.index(g)]) for i, g in enumerate(golds))
    assert n == len(golds)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-4, atol=1e-4)

    alone_loss, _ = label_loss(LabelTrie(tok, ["card_lost"]))(model, collate(encoded[:2],
                                                                             tok.pad_token_id))
    assert float(alone_loss.detach()) == 0.0


def test_a_classifier_trained_on_its_label_set_learns_it(tiny_model, classify_files, tmp_path):
    """loss: labels trains the adapters (the loss falls, the plan records it) and is refused
    where there is no label set."""
    from tuneloop.errors import TuneloopError
    from tuneloop.project import recipe_from_dict
    from tuneloop.data.splits import load_splits
    from tuneloop.train.lora import run_lora

    train_file, test_file = classify_files
    recipe = recipe_from_dict({"base_model": str(tiny_model), "task": "classify", "loss": "labels",
                               "data": {"train": str(train_file), "test": str(test_file)},
                               "epochs": 3, "learning_rate": 5e-3, "batch_size": 8})
    out = run_lora(recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    assert out["plan"].loss == "labels"
    curve = [loss for _, loss in json.loads((tmp_path / "run" / "curves.json").read_text())["train"]]
    assert curve[-1] < curve[0] and curve[0] > 0
    with pytest.raises((TuneloopError, ValueError), match="loss: labels"):
        recipe_from_dict({"task": "extract", "loss": "labels", "data": {"train": str(train_file)}})
