"""Task kinds: how a task builds prompts, reads the model's output and scores it.

Each kind is one module with the same four functions; `TASKS` is the explicit registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneloop.tasks import chat, classify, extract


@dataclass(frozen=True)
class TaskInfo:
    """What a task learned from its training data: the label set or the field names."""

    kind: str
    labels: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    system: str | None = None  # classify: the system turn the model was trained with

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "labels": list(self.labels), "fields": list(self.fields)}
        if self.kind == "classify":  # kept with the artifact: eval and serving prompt alike
            out["system"] = self.system or classify.TRAINED_SYSTEM
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        # A classifier saved before its system turn was recorded learned with the instruction.
        system = d.get("system", classify.SYSTEM if d["kind"] == "classify" else None)
        return cls(d["kind"], tuple(d.get("labels", ())), tuple(d.get("fields", ())),
                   system=system)


TASKS = {"classify": classify, "extract": extract, "chat": chat}
HEADLINE = {"classify": "accuracy", "extract": "field_f1", "chat": "rouge_l"}


def describe(kind: str, examples) -> TaskInfo:
    """The TaskInfo of a kind, derived from its training examples."""
    if kind == "classify":
        return TaskInfo(kind, labels=tuple(sorted({e.label or e.answer for e in examples})))
    if kind == "extract":
        names: dict[str, None] = {}
        for e in examples:
            for key in e.fields or {}:
                names.setdefault(key, None)
        return TaskInfo(kind, fields=tuple(names))
    return TaskInfo(kind)
