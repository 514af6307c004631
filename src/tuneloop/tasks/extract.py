"""extract: a JSON object with the training data's fields; scored field by field."""

from __future__ import annotations

import json
import re


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The messages for one example; the field names are always named (they define the output)."""
    system = ("Extract these fields from the user's text and reply with one JSON object with "
              "exactly these keys: " + ", ".join(info.fields) + ".")
    if zero_shot:
        system += " Use an empty string for a field that is not present."
    return [{"role": "system", "content": system}, *example.messages]


def schema(info) -> str:
    """The JSON schema every answer is decoded under (in eval and in serving): one object with
    exactly the task's fields, in their order, each any JSON value."""
    return json.dumps({"type": "object", "properties": {f: {} for f in info.fields},
                       "required": list(info.fields), "additionalProperties": False})


def grammar_compiler(tokenizer, vocab_size: int, stop_ids=()):
    """An xgrammar compiler over this tokenizer (it indexes the vocabulary: build it once)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=sorted(stop_ids) or None)
    return xgr.GrammarCompiler(info, max_threads=1)


def compile_schema(compiler, schema_text: str | None):
    """The grammar of `schema_text` (None: any JSON object), with compact separators, as
    json.dumps writes the training targets."""
    if schema_text is None:
        return compiler.compile_builtin_json_grammar()
    return compiler.compile_json_schema(schema_text, any_whitespace=False)


def target(example) -> str:
    return json.dumps(example.fields, ensure_ascii=False)


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
    """Case, whitespace, number formatting (currency, thousands separators) and date format
    (25/12/2018, 25-12-18, 25 Dec 2018, Dec 25, 2018 → 2018-12-25; day first, as on European
    and Asian receipts) do not make two values different."""
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
    return s


def metrics(predictions: list[dict | None], golds: list[dict], valid: list[bool]) -> dict:
    """JSON validity rate, per-field exact and normalized match, and micro P/R/F1 over fields."""
    n = len(golds)
    names = sorted({k for g in golds for k in g})
    per_field = {}
    tp = n_pred = n_gold = 0
    for name in names:
        exact = norm = 0
        for p, g in zip(predictions, golds):
            pv, gv = (p or {}).get(name), g.get(name)
            exact += pv == gv
            norm += normalize(pv) == normalize(gv)
        per_field[name] = {"exact": exact / n if n else 0.0, "normalized": norm / n if n else 0.0}
    for p, g in zip(predictions, golds):
        p = p or {}
        gold_set = {k for k, v in g.items() if normalize(v)}
        pred_set = {k for k, v in p.items() if normalize(v)}
        n_gold += len(gold_set)
        n_pred += len(pred_set)
        tp += sum(1 for k in gold_set & pred_set if normalize(p[k]) == normalize(g[k]))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"field_f1": f1, "field_precision": precision, "field_recall": recall,
            "json_valid_rate": sum(valid) / n if n else 0.0, "per_field": per_field, "n": n}
