"""PII detection and anonymization on the Presidio synthetic test set (../shared/data/presidio_pii).

Entity level: a gold entity is found when a finding of the same type overlaps it (also reported:
exact span, and found under any type — what anonymization needs). Gold labels map to tuneloop's
types (GPE, STREET_ADDRESS and ZIP_CODE are LOCATION; DOMAIN_NAME is URL). TITLE and
US_DRIVER_LICENSE are not claimed: findings on them are neither right nor wrong. Then every text
is anonymized and each claimed gold string is looked for in the output. The possessive-'s rule
is also scored alone (its names that are gold entities); `--data` another file of the same
shape (presidio_pii's train.jsonl) scores it where the model has seen the sentences.

`--lowercase` scores the same rows lower-cased, as chat messages are often written.

    python bench/pii_eval.py [--data ../shared/data/presidio_pii/test.jsonl] [--lowercase]
                             [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tuneloop.data import pii
from tuneloop.data import pii_model
from tuneloop.data.pii_model import lower_keep

GOLD = {"PERSON": "PERSON", "ORGANIZATION": "ORGANIZATION", "GPE": "LOCATION",
        "STREET_ADDRESS": "LOCATION", "ZIP_CODE": "LOCATION", "DATE_TIME": "DATE_TIME",
        "AGE": "AGE", "NRP": "NRP", "EMAIL_ADDRESS": "EMAIL_ADDRESS",
        "PHONE_NUMBER": "PHONE_NUMBER", "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN_CODE",
        "IP_ADDRESS": "IP_ADDRESS", "DOMAIN_NAME": "URL", "US_SSN": "US_SSN"}


def overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def possessive_rule(rows: list[dict]) -> dict:
    """The possessive-'s rule (pii.possessors) alone, with the gold people as the people who
    follow: how many of its names are gold entities of a claimed type, and the others."""
    names = right = 0
    others = []
    for row in rows:
        gold = [(e["start"], e["end"], GOLD.get(e["label"])) for e in row["entities"]]
        people = [(s, e, "PERSON", 1.0) for s, e, kind in gold if kind == "PERSON"]
        for start, end, _, _, _ in pii.possessors(row["text"], people):
            names += 1
            if any(kind and overlaps((start, end), (s, e)) for s, e, kind in gold):
                right += 1
            else:
                others.append(row["text"][start:end])
    return {"names": names, "gold_entities": right, "others": others[:20]}


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(here.parent.parent / "shared/data/presidio_pii/test.jsonl"))
    ap.add_argument("--out")
    ap.add_argument("--model", help="a trained recognizer's folder instead of the cached one")
    ap.add_argument("--lowercase", action="store_true", help="score the rows lower-cased")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    if args.lowercase:
        rows = [dict(r, text=lower_keep(r["text"]), entities=[
            dict(e, text=lower_keep(e["text"])) for e in r["entities"]]) for r in rows]
    t0 = time.perf_counter()
    detector = pii.Detector(model=Path(args.model) if args.model else None)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = detector.find_many([r["text"] for r in rows])
    detect_s = time.perf_counter() - t0
    tp, fn, fp, exact, any_type, ignored = (Counter() for _ in range(6))
    for row, hits in zip(rows, found):
        gold = [(e["start"], e["end"], GOLD.get(e["label"])) for e in row["entities"]]
        for s, e, kind in gold:
            if kind is None:
                continue
            same = [h for h in hits if h.type == kind and overlaps((h.start, h.end), (s, e))]
            (tp if same else fn)[kind] += 1
            exact[kind] += any(h.start == s and h.end == e for h in same)
            any_type[kind] += any(overlaps((h.start, h.end), (s, e)) for h in hits)
        for h in hits:
            span = (h.start, h.end)
            if any(k == h.type and overlaps(span, (s, e)) for s, e, k in gold):
                continue
            if any(k is None and overlaps(span, (s, e)) for s, e, k in gold):
                ignored[h.type] += 1
            else:
                fp[h.type] += 1
    per_type = {}
    for kind in sorted(set(tp) | set(fn) | set(fp)):
        n = tp[kind] + fn[kind]
        per_type[kind] = {"gold": n, "recall": round(tp[kind] / n, 3) if n else None,
                          "precision": round(tp[kind] / (tp[kind] + fp[kind]), 3)
                          if tp[kind] + fp[kind] else None,
                          "exact_span_recall": round(exact[kind] / n, 3) if n else None,
                          "any_type_recall": round(any_type[kind] / n, 3) if n else None}
    total_tp, total_fn, total_fp = sum(tp.values()), sum(fn.values()), sum(fp.values())
    # Anonymize and look for every claimed original string in the output.
    t0 = time.perf_counter()
    anonymized, _, _ = pii.anonymize_rows([{"text": r["text"]} for r in rows], detector)
    anon_s = time.perf_counter() - t0
    leaks = [(e["label"], e["text"]) for r, a in zip(rows, anonymized) for e in r["entities"]
             if e["label"] in GOLD and e["text"] in a["text"]]
    unclaimed = [(e["label"], e["text"]) for r, a in zip(rows, anonymized) for e in r["entities"]
                 if e["label"] not in GOLD and e["text"] in a["text"]]
    result = {
        "rows": len(rows), "lowercase": args.lowercase,
        "model": str(args.model or pii_model.ner_model_path()), "entities_claimed": total_tp + total_fn,
        "recall": round(total_tp / (total_tp + total_fn), 3),
        "precision": round(total_tp / (total_tp + total_fp), 3),
        "per_type": per_type, "findings_on_unclaimed_gold": dict(ignored),
        "leaked_after_anonymize": len(leaks), "leaks": leaks[:20],
        "unclaimed_left_in_output": len(unclaimed),
        "possessive_rule": possessive_rule(rows),
        "detector_load_s": round(load_s, 1), "detect_rows_per_s": round(len(rows) / detect_s, 1),
        "anonymize_rows_per_s": round(len(rows) / anon_s, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
