"""extract: a JSON object with the task's fields; scored field by field, value by value.

One answer shape, used alike by the prompt, the training target, the JSON schema of
constrained decoding, serving and the metric: every field of the task present, in its order,
`null` where the text holds none (a list where a field holds several values). Every key
present keeps the reply's shape fixed for the software that reads it, and a model learns to
answer "nothing" for a field as an explicit choice.
"""

from __future__ import annotations

import json
import re
from collections import Counter

TYPES = {"string": {"type": ["string", "null"]}, "number": {"type": ["number", "null"]},
         "list": {"type": ["array", "null"], "items": {"type": ["string", "number", "null"]}},
         "any": {}}


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The messages for one example; the fields are always named (they define the output)."""
    names = []
    for name in info.fields:
        spec = info.field_info.get(name) or {}
        what = " (" + spec["description"] + ")" if spec.get("description") else ""
        listed = zero_shot and spec.get("type") == "list"  # (a trained model knows the shape)
        names.append(name + what + (" [a list]" if listed else ""))
    system = ("Extract these fields from the user's text and reply with one JSON object with "
              "exactly these keys: " + ", ".join(names) + ".")
    if zero_shot:
        system += " Use null for a field that is not present."
    return [{"role": "system", "content": system}, *example.messages]


def canonical(fields: dict | None, info) -> dict:
    """The one answer shape: every field of the task, in order; null where absent or empty."""
    fields = fields or {}
    return {name: (None if fields.get(name) in (None, "", []) else fields[name])
            for name in info.fields}


def target(example, info=None) -> str:
    """The reply the model should produce: the row's fields in the one answer shape."""
    fields = canonical(example.fields, info) if info is not None else example.fields
    return json.dumps(fields, ensure_ascii=False)


def value_type(value) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "string" if isinstance(value, str) else "none"


def common_type(types: set) -> str:
    """The type a field's values share in the data (null/absent ones aside), else any."""
    kinds = types - {"none"}
    return next(iter(kinds)) if len(kinds) == 1 else "any"


def schema(info) -> str:
    """The JSON schema every answer is decoded under (in eval and in serving): one object with
    exactly the task's fields, in their order, each of its type or null."""
    props = {f: TYPES.get((info.field_info.get(f) or {}).get("type", "any"), {})
             for f in info.fields}
    return json.dumps({"type": "object", "properties": props, "required": list(info.fields),
                       "additionalProperties": False})


GRAMMAR_CACHE_BYTES = 64 * 2**20


def grammar_compiler(tokenizer, vocab_size: int, stop_ids=()):
    """An xgrammar compiler over this tokenizer (it indexes the vocabulary: build it once).
    It keeps nothing it compiles; a server keeps grammars in a `GrammarCache`."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=sorted(stop_ids) or None)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


class GrammarBusy(Exception):
    """Another grammar is compiling and did not finish within the caller's wait."""


class GrammarCache:
    """Compiled grammars by schema, within a bound in bytes (each grammar's own
    `memory_size_bytes`); the least recently used go first, and one larger than the bound is
    compiled for its request and not kept.

    xgrammar's own cache, bounded the same way, let the process grow ~55 MB for each large
    grammar it had evicted (`bench/grammar_memory.py`: 470, 536, 579 MB after three distinct
    20,000-value enums); kept here instead, with its cache off, the process stays flat (407).

    Grammars compile one at a time: a compile cannot be stopped once begun, so a caller that
    gives up on one leaves it running, and one at a time that costs at most one core. A call
    waits at most `wait_s` for another's compile to end (then `GrammarBusy`), so waiting
    callers cannot pile up; `started`, if given, is set when this call's compile begins."""

    def __init__(self, compiler, limit_bytes: int = GRAMMAR_CACHE_BYTES):
        import threading
        from collections import OrderedDict

        self.compiler, self.limit = compiler, limit_bytes
        self.entries: OrderedDict = OrderedDict()
        self.bytes, self.lock, self.compiling = 0, threading.Lock(), threading.Lock()

    def _kept(self, schema_text: str | None):
        with self.lock:
            if schema_text in self.entries:
                self.entries.move_to_end(schema_text)
                return self.entries[schema_text]
        return None

    def get(self, schema_text: str | None, started=None, wait_s: float | None = None):
        if (grammar := self._kept(schema_text)) is not None:
            return grammar
        if not self.compiling.acquire(timeout=-1 if wait_s is None else wait_s):
            raise GrammarBusy("another JSON schema is compiling")
        try:
            if (grammar := self._kept(schema_text)) is not None:  # compiled while it waited
                return grammar
            if started is not None:
                started.set()
            grammar = compile_schema(self.compiler, schema_text)
        finally:
            self.compiling.release()
        size = grammar.memory_size_bytes
        with self.lock:
            if size <= self.limit and schema_text not in self.entries:
                self.entries[schema_text] = grammar
                self.bytes += size
                while self.bytes > self.limit:
                    _, old = self.entries.popitem(last=False)
                    self.bytes -= old.memory_size_bytes
        return grammar


def compile_schema(compiler, schema_text: str | None):
    """The grammar of `schema_text` (None: any JSON object), with compact separators, as
    json.dumps writes the training targets."""
    if schema_text is None:
        return compiler.compile_builtin_json_grammar()
    return compiler.compile_json_schema(schema_text, any_whitespace=False)


def parse(output: str, info) -> tuple[dict | None, bool]:
    """(fields or None, valid JSON object): the first JSON object in the output."""
    text = output.strip()
    start = text.find("{")
    if start < 0:
        return None, False
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None, False
    return (obj, True) if isinstance(obj, dict) else (None, False)


_DATE = re.compile(r"^\d{1,4}[./\- ]\s*(\d{1,2}|[a-z]{3,9})\.?[./\- ,]\s*\d{2,4}$|"
                   r"^[a-z]{3,9}\.? \d{1,2},? \d{4}$")


def normalize(value) -> str:
    """Case, whitespace, punctuation, number formatting (currency, thousands separators) and
    date format (25/12/2018, 25-12-18, 25 Dec 2018, Dec 25, 2018 → 2018-12-25; day first, as on
    European and Asian receipts) do not make two values different.

    Punctuation counts as a space, as SQuAD's answer normalization drops it: a value copied
    from an OCR'd or hand-typed text differs from its annotation in commas and full stops far
    more often than in words (SROIE: 79 of 100 test addresses occur in their receipt's text
    with case and spacing aside, 94 of 100 with punctuation aside too; the set's own notes ask
    for punctuation-insensitive scoring). `exact` in the per-field metrics keeps the strict
    comparison."""
    s = re.sub(r"\s+", " ", str(value if value is not None else "")).strip().lower()
    number = re.sub(r"[,\s$€£¥]|^rm|^usd|^eur", "", s)
    try:
        return repr(float(number))
    except ValueError:
        pass
    if _DATE.match(s):
        from dateutil import parser

        try:
            return parser.parse(s, dayfirst=not s[:4].isdigit()).date().isoformat()
        except (ValueError, OverflowError):
            pass
    return " ".join(_PUNCTUATION.sub(" ", s).split())


_PUNCTUATION = re.compile(r"[^\w\s]|_")


def values(value) -> list[str]:
    """A field's values as normalized strings: none for null or empty, several for a list."""
    items = value if isinstance(value, list) else [value]
    return [v for v in (normalize(x) for x in items if x is not None) if v]


def has_values(fields: dict | None) -> bool:
    """Whether an answer (or a gold row) holds any value at all."""
    return any(values(v) for v in (fields or {}).values())


def abstained(prediction: dict | None) -> bool:
    """A valid answer of nothing (an unparsable reply is no answer)."""
    return prediction is not None and not has_values(prediction)


def value_counts(prediction: dict | None, gold: dict,
                 names: list[str]) -> list[tuple[int, int, int]]:
    """(values right, values predicted, values in the gold) of each named field of one row, each
    field a multiset of normalized values: the counts micro P/R/F1 add up over rows."""
    out = []
    for name in names:
        pred, want = Counter(values((prediction or {}).get(name))), Counter(values(gold.get(name)))
        out.append((sum((pred & want).values()), sum(pred.values()), sum(want.values())))
    return out


def _plain(text) -> str:
    return " ".join(str(text).lower().split())


def metrics(predictions: list[dict | None], golds: list[dict], valid: list[bool],
            texts: list[str] | None = None) -> dict:
    """JSON validity, per-field exact and normalized match and P/R/F1, and micro P/R/F1 over
    every value: each field a multiset of normalized values (a list field holds several; a
    value invented where the gold has none is a false positive). Rows with nothing to extract:
    the share answered with nothing (`empty_row_accuracy`). With the input `texts`: the share
    of predicted values that do not occur in their text at all (`hallucination_rate`)."""
    n = len(golds)
    names = sorted({k for g in golds for k in g})
    per_field = {}
    totals = Counter()
    rows = [value_counts(p, g, names) for p, g in zip(predictions, golds)]
    for i, name in enumerate(names):
        exact = sum((p or {}).get(name) == g.get(name) for p, g in zip(predictions, golds))
        counts = Counter(tp=sum(r[i][0] for r in rows), pred=sum(r[i][1] for r in rows),
                         gold=sum(r[i][2] for r in rows))
        norm = sum(r[i][0] == r[i][1] == r[i][2] for r in rows)  # the same multiset
        totals.update(counts)
        per_field[name] = {"exact": exact / n if n else 0.0, "normalized": norm / n if n else 0.0,
                           **_prf(counts), "gold_values": counts["gold"]}
    out = {"field_f1": _prf(totals)["f1"], "field_precision": _prf(totals)["precision"],
           "field_recall": _prf(totals)["recall"],
           "json_valid_rate": sum(valid) / n if n else 0.0, "per_field": per_field, "n": n}
    empty = [i for i, g in enumerate(golds) if not has_values(g)]
    if empty:
        out["empty_rows"] = len(empty)
        out["empty_row_accuracy"] = sum(abstained(predictions[i]) for i in empty) / len(empty)
    if texts is not None:
        said = [(x, t) for p, t in zip(predictions, texts) for v in (p or {}).values()
                for x in (v if isinstance(v, list) else [v]) if x is not None and _plain(x)]
        out["hallucination_rate"] = (sum(not _found(x, t) for x, t in said) / len(said)
                                     if said else 0.0)
    return out


def _found(value, text: str) -> bool:
    """Whether a predicted value occurs in its input: as text (case and spacing aside), or as
    a number written any way there ("1,234.50" holds 1234.5)."""
    if _plain(value) in _plain(text):
        return True
    number = normalize(value)
    return number.replace(".", "", 1).lstrip("-").replace("e", "", 1).isdigit() and any(
        normalize(n) == number for n in re.findall(r"\d[\d,.]*", str(text)))


def _prf(c: Counter) -> dict:
    precision = c["tp"] / c["pred"] if c["pred"] else 0.0
    recall = c["tp"] / c["gold"] if c["gold"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
