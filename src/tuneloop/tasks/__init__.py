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
    # extract: name -> {"type": string | number | list | any, "description": text or None}
    field_info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "labels": list(self.labels), "fields": list(self.fields)}
        if self.kind == "classify":  # kept with the artifact: eval and serving prompt alike
            out["system"] = self.system or classify.TRAINED_SYSTEM
        if self.field_info:
            out["field_info"] = self.field_info
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        # A classifier saved before its system turn was recorded learned with the instruction.
        system = d.get("system", classify.SYSTEM if d["kind"] == "classify" else None)
        return cls(d["kind"], tuple(d.get("labels", ())), tuple(d.get("fields", ())),
                   system=system, field_info=d.get("field_info") or {})


TASKS = {"classify": classify, "extract": extract, "chat": chat}
HEADLINE = {"classify": "accuracy", "extract": "field_f1", "chat": "rouge_l"}


def describe(kind: str, examples, fields=None) -> TaskInfo:
    """The TaskInfo of a kind, derived from its training examples; for extraction the recipe's
    `fields` (name, type, description), when given, name the fields instead of the data."""
    if kind == "classify":
        return TaskInfo(kind, labels=tuple(sorted({e.label or e.answer for e in examples})))
    if kind == "extract":
        seen: dict[str, set] = {}
        for e in examples:
            for key, value in (e.fields or {}).items():
                seen.setdefault(key, set()).add(extract.value_type(value))
        if fields:
            info = {f.name: {"type": f.type or extract.common_type(seen.get(f.name, set())),
                             "description": f.description} for f in fields}
        else:
            info = {name: {"type": extract.common_type(types), "description": None}
                    for name, types in seen.items()}
        return TaskInfo(kind, fields=tuple(info), field_info=info)
    return TaskInfo(kind)
