"""The forgetting check: did fine-tuning cost the model general ability?

After every run the fine-tuned model and its base answer the same small general suite
(resources/general.jsonl: arithmetic, knowledge, instruction following, and GSM8K solutions
scored by their loss). The run is flagged when accuracy drops by more than
`max_accuracy_drop` or the loss rises by more than `max_loss_increase` (relative). The base's
score is computed once per base model and suite and kept in the workspace cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tuneloop.core.batching import padded_batches
from tuneloop.core.tokenize import encode
from tuneloop.models.generate import generate
from tuneloop.models.scoring import mean_loss
from tuneloop.core.files import atomic_write

SUITE = Path(__file__).parent / "resources" / "general.jsonl"
MAX_NEW_TOKENS = 16


def suite() -> list[dict]:
    return [json.loads(line) for line in SUITE.open(encoding="utf-8")]


def suite_hash() -> str:
    return hashlib.sha256(SUITE.read_bytes()).hexdigest()[:16]


def right(item: dict, reply: str) -> bool:
    """A whole-number answer is right when the reply's first number equals it; a text answer
    when the reply contains it, case aside."""
    expected = item["answer"].strip()
    if re.fullmatch(r"-?\d+", expected):
        found = re.search(r"-?\d[\d,]*(?:\.\d+)?", reply)
        return found is not None and float(found.group().replace(",", "")) == float(expected)
    return expected.casefold() in reply.casefold()


def score(model, tokenizer) -> dict:
    """Accuracy on the answered items (overall and per kind) and the mean loss of the
    reference solutions."""
    items = suite()
    answered = [i for i in items if i.get("score") != "loss"]
    replies, _ = generate(model, tokenizer, [[{"role": "user", "content": i["prompt"]}]
                                             for i in answered], MAX_NEW_TOKENS)
    marks = [right(i, r) for i, r in zip(answered, replies)]
    kinds: dict[str, list[bool]] = {}
    for item, mark in zip(answered, marks):
        kinds.setdefault(item["kind"], []).append(mark)
    scored = [i for i in items if i.get("score") == "loss"]
    enc = [encode(tokenizer, [{"role": "user", "content": i["prompt"]}], i["answer"])
           for i in scored]
    loss = mean_loss(model, padded_batches(enc, tokenizer.pad_token_id))
    return {"accuracy": sum(marks) / len(marks),
            "by_kind": {k: sum(v) / len(v) for k, v in kinds.items()},
            "loss": loss, "items": len(items),
            "answers": [{"prompt": i["prompt"], "reply": r, "right": m}
                        for i, r, m in zip(answered, replies, marks)]}


def base_score(model, tokenizer, base_model: str, workspace: Path, load_base=None) -> dict:
    """The base model's score, from the cache or computed: a PEFT model with its adapters
    switched off is exactly its base; otherwise `load_base()` loads it."""
    path = workspace / "cache" / f"general-{suite_hash()}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if base_model in cached:
        return cached[base_model]
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            result = score(model, tokenizer)
    else:
        result = score(load_base(), tokenizer)
    cached[base_model] = result
    atomic_write(path, json.dumps(cached))
    return result


def check(model, tokenizer, base_model: str, workspace: Path, spec, load_base=None) -> dict:
    """Base vs fine-tuned on the general suite, and whether the drop is beyond the limits."""
    base = base_score(model, tokenizer, base_model, workspace, load_base)
    tuned = score(model, tokenizer)
    drop = base["accuracy"] - tuned["accuracy"]
    increase = (tuned["loss"] - base["loss"]) / base["loss"] if base["loss"] else 0.0
    reasons = []
    if drop > spec.max_accuracy_drop:
        reasons.append(f"general accuracy fell {drop:.2f} ({base['accuracy']:.2f} → "
                       f"{tuned['accuracy']:.2f}), more than {spec.max_accuracy_drop:.2f}")
    if increase > spec.max_loss_increase:
        reasons.append(f"loss on reference solutions rose {increase:.0%} ({base['loss']:.3f} → "
                       f"{tuned['loss']:.3f}), more than {spec.max_loss_increase:.0%}")
    return {"suite": suite_hash(), "items": tuned["items"],
            "base": {k: base[k] for k in ("accuracy", "by_kind", "loss")},
            "fine_tuned": {k: tuned[k] for k in ("accuracy", "by_kind", "loss")},
            "accuracy_drop": drop, "loss_increase": increase, "flagged": bool(reasons),
            "reasons": reasons, "answers": tuned["answers"]}
