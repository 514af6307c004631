"""TaskInfo: what a task learned from its training data (the label set, the field names), kept
with every artifact so evaluation and serving prompt exactly as training did."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskInfo:
    """What a task learned from its training data: the label set or the field names."""

    kind: str
    labels: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    system: str | None = None  # classify: the system turn the model was trained with
    # extract: name -> {"type": string | number | list | any, "description": text or None}
    field_info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "labels": list(self.labels), "fields": list(self.fields)}
        if self.system is not None:  # kept with the artifact: eval and serving prompt alike
            out["system"] = self.system
        if self.field_info:
            out["field_info"] = self.field_info
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        return cls(d["kind"], tuple(d.get("labels", ())), tuple(d.get("fields", ())),
                   system=d.get("system", SAVED_WITHOUT_SYSTEM.get(d["kind"])),
                   field_info=d.get("field_info") or {})


# An artifact saved before its system turn was recorded learned with its task's instruction
# (classify.SYSTEM; tests/test_labels.py checks they are the same text).
SAVED_WITHOUT_SYSTEM = {"classify": "Classify the user's message. Reply with the label only."}


def shuffled(candidates: list, seed: int) -> list:
    """`candidates` in a seeded order (a copy): how shots are drawn where a task has no order
    of its own."""
    out = candidates[:]
    random.Random(seed).shuffle(out)
    return out


def answer_room(tokenizer, answers: list[str]) -> int:
    """New tokens enough for the longest expected answer, with a margin (at most 512)."""
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return min(512, int(longest * 1.5) + 16)
