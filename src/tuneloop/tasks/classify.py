"""classify: one label per input; the output is mapped to the nearest known label."""

from __future__ import annotations

import dataclasses
import difflib
import re

from tuneloop.tasks.info import TaskInfo, shuffled

SYSTEM = "Classify the user's message. Reply with the label only."
# A trained model needs no instruction, only a system turn of its own: without one, chat
# templates such as SmolLM2's insert a default system prompt (20 tokens). "Classify." costs 3;
# the whole banking77 prompt falls from 45 tokens to 34 (tests/test_labels.py counts them).
TRAINED_SYSTEM = "Classify."

HEADLINE = "accuracy"
COLUMNS = ["accuracy", "macro_f1"]  # the terminal's table of an evaluation
ROW_HEADLINE = HEADLINE  # compare's per-row mean: accuracy splits by row
PAIRED_EXACT = True  # compare adds McNemar's exact test: each row is right or wrong
REFERENCE_LOSS = False  # no perplexity of references: the label set is scored instead
# A label head decides (one weight row per label over the prompt's last hidden state) or the
# model writes its label; the label-set loss trains over the labels where they branch.
HEADS = ("labels", "none")  # the recipe's `head` choices, the default first
LOSSES = ("tokens", "labels")  # the recipe's `loss` choices, the default first


def default_head(info) -> str:
    """The head a run trains when its recipe names none (and its method trains one)."""
    return HEADS[0]


def describe(examples, fields=None) -> TaskInfo:
    """The label set of the training rows, and the short system turn a trained model keeps."""
    return TaskInfo("classify", labels=tuple(sorted({e.label or e.answer for e in examples})),
                    system=TRAINED_SYSTEM)


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The messages for one example. Zero-shot prompts instruct and list the labels; trained
    ones carry the short system turn the model learned with."""
    if zero_shot:
        system = SYSTEM + " Labels: " + ", ".join(info.labels) + "."
    else:  # what the model learned with (an artifact records it: tasks.TaskInfo.system)
        system = (info.system if info else None) or TRAINED_SYSTEM
    return [{"role": "system", "content": system}, *example.messages]


def target(example, info=None) -> str:
    """The reply the model should produce."""
    return example.label or example.answer


def gold(example, info) -> str:
    """What a prediction is scored against."""
    return target(example)


def with_answer(example, reply: str, info):
    """The example labelled by a teacher's reply (kept as it was when the reply is empty)."""
    return dataclasses.replace(example, label=reply or example.label,
                               answer=reply or example.answer)


def shot_order(candidates: list, seed: int) -> list:
    """A seeded order that cycles through the labels, so any first k shots cover them evenly."""
    by_label: dict[str, list] = {}
    for e in shuffled(candidates, seed):
        by_label.setdefault(e.label, []).append(e)
    out: list = []
    while any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label]:
                out.append(by_label[label].pop())
    return out


def max_new_tokens(tokenizer, examples, info) -> int:
    """The longest label's tokens and a margin."""
    return max(len(tokenizer(label, add_special_tokens=False)["input_ids"])
               for label in info.labels) + 4


def grammar(model, tokenizer, info):
    """None: a classifier is decided over its label trie (`decide`), not decoded freely."""
    return None


def answer_schema(info) -> None:
    """None: served replies are held to the label trie instead of a JSON schema."""
    return None


def decide(model, tokenizer, prompts: list[list[int]], info, on_batch=None,
           prefix: list[int] | None = None, batch_size: int = 16, messages=None):
    """Each prompt's (token ids, after `prefix` if given) most probable label under the label
    trie (tasks.labels), its probability, and the tokens its answer takes (the label's tokens
    and end-of-turn); None when the task knows no labels (then the model writes its answer)."""
    if not info.labels:
        return None
    from tuneloop.tasks.labels import LabelTrie, label_distribution

    trie = LabelTrie(tokenizer, info.labels)
    probs = label_distribution(model, tokenizer, trie, prompts, batch_size=batch_size,
                               on_batch=on_batch, prefix=prefix)
    best = probs.argmax(-1).tolist()
    lengths = {i: len(trie.path[n]) for n, i in trie.leaf.items()}
    return ([info.labels[b] for b in best], [float(probs[r, b]) for r, b in enumerate(best)],
            [lengths[b] for b in best])


def value_confidences(rows: list[dict]) -> None:
    """None: a row's confidence is its answer's (the runner's calibration)."""
    return None


def row_score(row: dict) -> float:
    """One row's accuracy: 1 when the prediction is the gold label."""
    return float(row["prediction"] == row["gold"])


def value_counts_table(rows: list[dict]):
    """None: accuracy's interval is a bootstrap of the row scores."""
    return None


def shared_extras(rows: list[dict]) -> dict:
    """Nothing beyond the headline for compare's table."""
    return {}


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", "_", s.strip().strip(".\"'`").lower())


def parse(output: str, info) -> tuple[str, bool]:
    """(label, exact): the known label the output names, and whether it named one exactly."""
    by_norm = {_norm(label): label for label in info.labels}
    first_line = output.strip().splitlines()[0] if output.strip() else ""
    key = _norm(first_line)
    if key in by_norm:
        return by_norm[key], True
    for norm, label in sorted(by_norm.items(), key=lambda kv: -len(kv[0])):
        if norm in _norm(output):
            return label, False
    close = difflib.get_close_matches(key, list(by_norm), n=1, cutoff=0.0)
    return (by_norm[close[0]] if close else ""), False


def metrics(predictions: list[str], golds: list[str], exact: list[bool], examples=None) -> dict:
    """Accuracy, macro precision/recall/F1 over the gold label set, and the confusion matrix."""
    n = len(golds)
    labels = sorted(set(golds))
    confusion: dict[str, dict[str, int]] = {g: {} for g in labels}
    for p, g in zip(predictions, golds):
        confusion[g][p] = confusion[g].get(p, 0) + 1
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = confusion[label].get(label, 0)
        predicted = sum(1 for p in predictions if p == label)
        actual = sum(confusion[label].values())
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    k = len(labels) or 1
    return {
        "accuracy": sum(p == g for p, g in zip(predictions, golds)) / n if n else 0.0,
        "macro_precision": sum(precisions) / k,
        "macro_recall": sum(recalls) / k,
        "macro_f1": sum(f1s) / k,
        "exact_label_rate": sum(exact) / n if n else 0.0,
        "n": n,
        "confusion": confusion,
    }


# Synthesis (tuneloop synth): what a teacher is asked for and how its reply becomes a row.

SYNTH_MODES = ("label", "expand")  # the synth modes this kind supports, the usual one first
SYNTH_CONSENSUS = True  # label mode samples `consistency.samples` answers and keeps the majority
EXPAND_BY_LABEL = True  # expand writes inputs per seed label; `verify` keeps those labelled so
OWN_SYSTEM_TURN = True  # prompt() opens with the task's system turn: an instruction replaces it


def synth_info(recipe, seeds: list[dict], trained) -> TaskInfo:
    """The label set synth asks for: the recipe's, else the seeds', else the teacher run's."""
    labels = recipe.labels or sorted({str(r["label"]) for r in seeds if r.get("label")}) or \
        (list(trained.labels) if trained else [])
    if not labels:
        from tuneloop.errors import TuneloopError

        raise TuneloopError("classify needs its label set: labels: [...], seeds with labels, "
                            "or a teacher run trained on the task")
    return TaskInfo("classify", labels=tuple(labels), system=TRAINED_SYSTEM)


def synth_max_tokens(limit: int, info) -> int:
    """A teacher's longest label reply: a label is short, so a reply that runs on is not one."""
    return min(limit, 8 + max(len(label) for label in info.labels) // 2)


def synth_answer(text: str, info) -> tuple[object, str | None]:
    """(the label a teacher's reply names exactly, None) or (None, "invalid_label")."""
    label, exact = parse(text, info)
    return (label, None) if exact else (None, "invalid_label")


def synth_row(messages: list[dict], answer) -> dict:
    """The dataset row of an input's turns and the teacher's label."""
    return {"text": messages[-1]["content"], "label": answer}
