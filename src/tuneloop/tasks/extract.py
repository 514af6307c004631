"""extract: a JSON object with the task's fields; scored field by field, value by value.

One answer shape, used alike by the prompt, the training target, the JSON schema of
constrained decoding, serving and the metric: every field of the task present, in its order,
`null` where the text holds none (a list where a field holds several values). Every key
present keeps the reply's shape fixed for the software that reads it, and a model learns to
answer "nothing" for a field as an explicit choice.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

from tuneloop.tasks.info import TaskInfo, answer_room, shuffled

HEADLINE = "field_f1"
COLUMNS = ["field_f1", "json_valid_rate"]  # the terminal's table of an evaluation
ROW_HEADLINE = "field_f1_row_mean"  # micro field F1 does not split by row: its row mean does
PAIRED_EXACT = False
REFERENCE_LOSS = False
HEADS = ("none", "spans")  # the recipe's `head` choices
LOSSES = ("tokens",)  # the recipe's `loss` choices, the default first


SPAN_SHARE = 0.9  # a field's share of training values found in their text, for the span head


def default_head(info) -> str:
    """spans (models/spans.py) when nearly every training value of every field is a span of
    its text (`in_text` >= SPAN_SHARE, spacing and punctuation aside), else none: the model
    writes its JSON under the fields' schema.

    Evidence (bench/span_context.py, WNUT 2017's validation split, one epoch each, the same
    175 updates; bench/RESULTS.md "span head"): field F1 0.564 with the span head against
    0.490 written, on 172,914 training tokens against 321,867 (12.6 min against 24.3)."""
    measured = bool(info and info.fields) and all(
        "in_text" in (info.field_info.get(n) or {}) for n in info.fields)
    return "spans" if measured and spanned(info) == list(info.fields) else HEADS[0]


def spanned(info) -> list[str]:
    """The fields a span head finds (`in_text` >= SPAN_SHARE, or no training values to say
    otherwise); the others are written beside them (a hybrid extractor)."""
    return [n for n in info.fields
            if (info.field_info.get(n) or {}).get("in_text", 1.0) >= SPAN_SHARE]


def subset(info, names) -> TaskInfo:
    """The task narrowed to some of its fields (a hybrid extractor's written part)."""
    return dataclasses.replace(info, fields=tuple(names),
                               field_info={n: info.field_info.get(n) or {} for n in names})


TYPES = {"string": {"type": ["string", "null"]}, "number": {"type": ["number", "null"]},
         "list": {"type": ["array", "null"], "items": {"type": ["string", "number", "null"]}},
         "any": {}}


def describe(examples, fields=None) -> TaskInfo:
    """The fields and their types, from the training rows; the recipe's `fields` (name, type,
    description), when given, name the fields instead of the data."""
    seen: dict[str, set] = {}
    longest: Counter = Counter()
    for e in examples:
        for key, value in (e.fields or {}).items():
            seen.setdefault(key, set()).add(value_type(value))
            if isinstance(value, list):
                longest[key] = max(longest[key], len(value))
    if fields:
        info = {f.name: {"type": f.type or common_type(seen.get(f.name, set())),
                         "description": f.description} for f in fields}
    else:
        info = {name: {"type": common_type(types), "description": None}
                for name, types in seen.items()}
    for name, spec in info.items():
        if spec["type"] == "list" and longest[name]:  # (bounds the schema: no endless list)
            spec["max_items"] = longest[name]
    for name, share in in_text(examples, list(info)).items():
        info[name]["in_text"] = share
    return TaskInfo("extract", fields=tuple(info), field_info=info)


def in_text(examples, names) -> dict[str, float]:
    """Each field's share of training values found in their row's text (case, spacing and
    punctuation aside: models/spans.locate): what a span head can copy out of the text;
    fields with no values left out."""
    from tuneloop.models.spans import locate

    found, total = Counter(), Counter()
    for e in examples:
        for name in names:
            _, hit, n = locate(_text(e), e.fields or {}, [name])
            found[name] += hit
            total[name] += n
    return {n: round(found[n] / total[n], 4) for n in names if total[n]}


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The messages for one example; the fields are always named (they define the output)."""
    return [{"role": "system", "content": _system(info, zero_shot)}, *example.messages]


def _system(info, zero_shot: bool = False) -> str:
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
    return system


def canonical(fields: dict | None, info) -> dict:
    """The one answer shape: every field of the task, in order; null where absent or empty."""
    fields = fields or {}
    return {name: (None if fields.get(name) in (None, "", []) else fields[name])
            for name in info.fields}


def target(example, info=None) -> str:
    """The reply the model should produce: the row's fields in the one answer shape."""
    fields = canonical(example.fields, info) if info is not None else example.fields
    return json.dumps(fields, ensure_ascii=False)


def gold(example, info) -> dict:
    """What a prediction is scored against: the row's fields in the one answer shape."""
    return canonical(example.fields, info)


def with_answer(example, reply: str, info):
    """The example with a teacher's reply as its fields, where the reply parses."""
    fields, ok = parse(reply, info)
    return dataclasses.replace(example, fields=fields if ok else example.fields,
                               answer=reply or example.answer)


def shot_order(candidates: list, seed: int) -> list:
    """A seeded shuffle."""
    return shuffled(candidates, seed)


def max_new_tokens(tokenizer, examples, info) -> int:
    """Room for the longest answer, with a margin."""
    return answer_room(tokenizer, [target(e, info) for e in examples])


def answer_schema(info) -> str | None:
    """The JSON schema every reply is held to: an object with exactly the task's fields."""
    return schema(info) if info.fields else None


def grammar(model, tokenizer, info):
    """The task's fields as the grammar every reply is decoded under (baselines too)."""
    text = answer_schema(info)
    if text is None:
        return None
    compiler = grammar_compiler(tokenizer, model.get_output_embeddings().weight.shape[0],
                                {tokenizer.eos_token_id})
    return compile_schema(compiler, text)


def decide(model, tokenizer, prompts, info, on_batch=None, prefix=None, batch_size: int = 16,
           messages=None):
    """With a span head (models/spans.py): `spanned_answers` at temperature 0 (the outputs,
    the tag paths' probabilities, the tokens written, each value's confidence). None
    without one: the model writes its answer."""
    from tuneloop.models import spans

    if spans.find(model) is None:
        return None
    if messages is None or prefix is not None:
        raise ValueError("a model with a span head reads each row's own text, without shots")
    outputs, paths, counts, values = spanned_answers(model, tokenizer, messages, info,
                                                     batch_size=batch_size, on_batch=on_batch)
    return outputs, paths, counts, [{"value_confidence": c} for c in values]


def spanned_answers(model, tokenizer, messages, info, batch_size: int = 16, on_batch=None,
                    temperature: float = 0.0, generator=None, seed: int = 0):
    """Each conversation's answer as JSON from a model with a span head: its spanned fields
    found in the last user turn's text (the most probable valid tag path at temperature 0,
    else one drawn), with that path's probability (that the row is tagged exactly right) and
    each value's own; a hybrid extractor's other fields written under their schema from the
    prompt that names only them (its system turn in place of any other), at the same
    temperature (seeded by `seed`), and merged into the one answer. (outputs, path
    probabilities, tokens written, value confidences), in the conversations' order."""
    from tuneloop.models import spans

    head = spans.find(model)
    found = spans.extract(model, tokenizer, [spans.text_of(m) for m in messages],
                          info.field_info, batch_size=batch_size, on_batch=on_batch,
                          temperature=temperature, generator=generator)
    answers, counts = [dict(a) for a, _, _ in found], [0] * len(found)
    if head.written:
        from tuneloop.models.generate import generate

        part = subset(info, head.written)
        narrowed = [[{"role": "system", "content": _system(part)},
                     *[t for t in m if t.get("role") != "system"]] for m in messages]
        replies, counts = generate(model, tokenizer, narrowed, head.written_tokens,
                                   temperature=temperature, seed=seed,
                                   grammar=grammar(model, tokenizer, part))
        for answer, reply in zip(answers, replies):
            answer.update(parse(reply, part)[0] or {})
    return ([json.dumps(canonical(a, info), ensure_ascii=False) for a in answers],
            [p for _, _, p in found], counts, [c for _, c, _ in found])


def value_confidences(rows: list[dict]) -> tuple[list[float], list[bool]] | None:
    """Each predicted value's confidence (a span head's: its span's probability) and whether
    its field's gold holds it (normalized, as the metric counts), over the rows that carry
    them; None where none does (a written answer)."""
    if not any("value_confidence" in row for row in rows):
        return None
    judged: tuple[list[float], list[bool]] = ([], [])
    for row in rows:
        for name, conf in (row.get("value_confidence") or {}).items():
            predicted = (row.get("prediction") or {}).get(name)
            gold = values((row.get("gold") or {}).get(name))
            for value, p in zip(predicted if isinstance(predicted, list) else [predicted],
                                conf if isinstance(conf, list) else [conf]):
                judged[0].append(p)
                judged[1].append(normalize(value) in gold)
    return judged


def row_score(row: dict) -> float:
    """One row's field F1; a row with nothing to extract scores 1 when nothing was answered."""
    if not has_values(row["gold"]):
        return float(abstained(row["prediction"]))
    return float(metrics([row["prediction"]], [row["gold"]],
                         [row["prediction"] is not None])["field_f1"])


def value_counts_table(rows: list[dict]):
    """(field names, [rows, fields, 3] counts of values right, predicted and gold): micro
    field F1's interval resamples these counts, overall and field by field."""
    import numpy as np

    names = sorted({k for r in rows for k in r["gold"]})
    counts = np.array([value_counts(r["prediction"], r["gold"], names) for r in rows],
                      dtype=np.int64).reshape(len(rows), len(names), 3)
    return names, counts


def shared_extras(rows: list[dict]) -> dict:
    """Abstention on the shared rows, beside compare's headline."""
    found = metrics([r["prediction"] for r in rows], [r["gold"] for r in rows],
                    [r["prediction"] is not None for r in rows])
    return {"empty_row_accuracy": found.get("empty_row_accuracy")}


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
    exactly the task's fields, in their order, each of its type or null; a list no longer
    than the training data's longest (so no model can loop inside one)."""
    props = {}
    for f in info.fields:
        spec = info.field_info.get(f) or {}
        props[f] = dict(TYPES.get(spec.get("type", "any"), {}))
        if spec.get("type") == "list" and spec.get("max_items"):
            props[f]["maxItems"] = spec["max_items"]  # as long as any training row's list
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


def values(value, norm=None) -> list[str]:
    """A field's values as normalized strings (`norm`, default `normalize`): none for null or
    empty, several for a list."""
    items = value if isinstance(value, list) else [value]
    return [v for v in ((norm or normalize)(x) for x in items if x is not None) if v]


def as_written(value) -> str:
    """A value compared strictly: as written, spacing collapsed (case and punctuation count)."""
    return " ".join(str(value).split())


def has_values(fields: dict | None) -> bool:
    """Whether an answer (or a gold row) holds any value at all."""
    return any(values(v) for v in (fields or {}).values())


def abstained(prediction: dict | None) -> bool:
    """A valid answer of nothing (an unparsable reply is no answer)."""
    return prediction is not None and not has_values(prediction)


def value_counts(prediction: dict | None, gold: dict, names: list[str],
                 norm=None) -> list[tuple[int, int, int]]:
    """(values right, values predicted, values in the gold) of each named field of one row, each
    field a multiset of normalized values: the counts micro P/R/F1 add up over rows."""
    out = []
    for name in names:
        pred = Counter(values((prediction or {}).get(name), norm))
        want = Counter(values(gold.get(name), norm))
        out.append((sum((pred & want).values()), sum(pred.values()), sum(want.values())))
    return out


def _plain(text) -> str:
    return " ".join(str(text).lower().split())


def metrics(predictions: list[dict | None], golds: list[dict], valid: list[bool],
            examples=None) -> dict:
    """JSON validity, per-field exact and normalized match and P/R/F1, and micro P/R/F1 over
    every value: each field a multiset of normalized values (a list field holds several; a
    value invented where the gold has none is a false positive); `strict_field_f1` the same
    over values as written (case and punctuation count, as CoNLL's exact-span scoring). Rows with nothing to extract:
    the share answered with nothing (`empty_row_accuracy`). With the `examples` (their input
    texts): the share of predicted values that occur in no input at all (`hallucination_rate`)."""
    texts = None if examples is None else [_text(e) for e in examples]
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
    strict = Counter()  # each value as written: entity-level F1 with exact strings
    for p, g in zip(predictions, golds):
        for tp, pred, want in value_counts(p, g, names, as_written):
            strict.update(tp=tp, pred=pred, gold=want)
    out = {"field_f1": _prf(totals)["f1"], "field_precision": _prf(totals)["precision"],
           "field_recall": _prf(totals)["recall"], "strict_field_f1": _prf(strict)["f1"],
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


def _text(example) -> str:
    return example.text or " ".join(m["content"] for m in example.messages)


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


# Synthesis (tuneloop synth): what a teacher is asked for and how its reply becomes a row.

SYNTH_MODES = ("label", "expand")  # the synth modes this kind supports, the usual one first
SYNTH_CONSENSUS = True  # label mode samples `consistency.samples` answers and keeps the majority
EXPAND_BY_LABEL = False  # expand writes inputs from all seeds alike; nothing to verify
OWN_SYSTEM_TURN = True  # prompt() opens with the task's system turn: an instruction replaces it


def synth_info(recipe, seeds: list[dict], trained) -> TaskInfo:
    """The field names synth asks for: the recipe's, else the seeds', else the teacher run's."""
    fields = recipe.fields or list(dict.fromkeys(k for r in seeds for k in r.get("fields") or {})) \
        or (list(trained.fields) if trained else [])
    if not fields:
        from tuneloop.errors import TuneloopError

        raise TuneloopError("extract needs its field names: fields: [...], seeds with fields, or "
                            "a teacher run trained on the task")
    return TaskInfo("extract", fields=tuple(fields))


def synth_max_tokens(limit: int, info) -> int:
    """A teacher's longest reply: the teacher spec's limit."""
    return limit


def synth_answer(text: str, info) -> tuple[object, str | None]:
    """(every field of the teacher's flat JSON object, None) or (None, why it is not valid)."""
    fields, ok = parse(text, info)
    if not ok:
        return None, "invalid_json"
    if set(fields) - set(info.fields):
        return None, "unknown_field"
    if any(not isinstance(v, (str, int, float, bool, type(None))) for v in fields.values()):
        return None, "nested_value"
    return {f: fields.get(f, "") for f in info.fields}, None


def synth_row(messages: list[dict], answer) -> dict:
    """The dataset row of an input's turns and the teacher's fields."""
    return {"text": messages[-1]["content"], "fields": answer}
