"""Choosing the name recognizer's settings without looking at the test file: a fifth of the
shipped training sentences (by hash) is held out, the recognizer (pii_model.train_ner, as
tuneloop trains it) learns from the rest with the settings given, and the model alone (no
pattern layer, no propagation) is scored on the held-out fifth, as written and lower-cased:
typed recall and precision, and the gold entities no span of any type touches (what
anonymization would leave). Also WNUT 2017's test sentences (../shared/data/wnut17, where
present): people, places, companies and groups in noisy user text.

    python bench/pii_model_select.py [--epochs 3] [--swap-copies 2] [--lr 1e-4]
                                     [--wnut17 yes|no] [--no-case-feature] [--plain-orgs 0.33]
                                     [--min-scores 0.4 0.6] [--test]

Companies named with ordinary words ("Home Depot", "Best Buy") are the hardest names for the
model: held-out sentences that name a company are also read with it replaced by such a real
company (PLAIN_COMPANIES, none of them in the training rows or the test file), and the share of
those the model leaves untouched is reported.

`--test` also scores presidio_pii's test file (for the record, once settings are chosen).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

from pii_eval import GOLD

from tuneloop.data import pii
from tuneloop.data import pii_model as pm

HERE = Path(__file__).resolve().parent
TEST = HERE.parent.parent / "shared/data/presidio_pii/test.jsonl"
# WNUT 2017's labels → the gold labels pii_eval maps (product and creative-work are unclaimed).
WNUT_GOLD = {"person": "PERSON", "location": "GPE", "corporation": "ORGANIZATION",
             "group": "ORGANIZATION"}


# Real companies named with ordinary English words; only for scoring (never trained on).
PLAIN_COMPANIES = (
    "Home Depot", "Best Buy", "General Motors", "Whole Foods", "American Express",
    "United Airlines", "Southwest Airlines", "Public Storage", "Dollar General", "Family Dollar",
    "Union Pacific", "Waste Management", "General Mills", "State Farm", "Liberty Mutual",
    "Sun Life", "Standard Chartered", "Royal Mail", "British Airways", "Virgin Media",
    "Burger King", "Dairy Queen", "Foot Locker", "Urban Outfitters", "Best Western", "Red Bull",
    "Under Armour", "Blue Apron", "Capital One", "Northern Trust", "Energy Transfer",
    "Advance Auto Parts", "Office Depot", "Frontier Communications", "First Solar",
    "Ocean Spray", "Fresh Market", "Container Store", "General Electric", "Universal Music",
    "Clear Channel", "Rite Aid", "Dish Network", "Southern Company", "Western Union",
    "National Grid", "Standard Life", "Direct Line", "Green Flag", "Carphone Warehouse",
    "Progressive", "Square", "Oracle", "Shell", "Target", "Staples", "Continental", "Paramount",
    "Discover", "Sprint", "Delta", "Visa")


def plain_company_rows(rows: list[dict], names: list[str], copies: int = 3) -> list[dict]:
    """`rows` that name a company, each `copies` times with its companies replaced by names
    from `names`, and only those companies as gold entities."""
    rng = random.Random(0)
    swapped = [pm.swap_entities(row, lambda label, original: rng.choice(names)
                                if label == "ORGANIZATION" else None)
               for _ in range(copies) for row in rows
               if any(label == "ORGANIZATION" for _, _, label in row["entities"])]
    return [dict(r, entities=[e for e in r["entities"] if e[2] == "ORGANIZATION"])
            for r in swapped]


def held_out(row: dict) -> bool:
    return int(hashlib.sha256(row["text"].encode()).hexdigest(), 16) % 5 == 0


def score(model: pm.NameModel, rows: list[dict], name: str, min_score: float) -> dict:
    tp = fn = fp = 0
    untouched = []
    for row, found in zip(rows, model.find([r["text"] for r in rows])):
        found = [f for f in found if f[3] >= min_score]
        gold = [(e[0], e[1], GOLD.get(e[2])) if isinstance(e, list) else
                (e["start"], e["end"], GOLD.get(e["label"])) for e in row["entities"]]
        for s, e, kind in gold:
            if kind is None:
                continue
            hit = any(a < e and s < b and t == kind for a, b, t, _ in found)
            tp, fn = tp + hit, fn + (not hit)
            if not any(a < e and s < b for a, b, _, _ in found):
                untouched.append(row["text"][s:e])
        fp += sum(1 for a, b, t, _ in found
                  if not any(a < e and s < b and kind in (t, None) for s, e, kind in gold))
    result = {"rows": len(rows), "recall": round(tp / (tp + fn), 3),
              "precision": round(tp / (tp + fp), 3), "untouched": len(untouched),
              "untouched_strings": untouched[:15]}
    print(f"{name} (score >= {min_score})", json.dumps(result), flush=True)
    return result


def false_alarms(model: pm.NameModel, min_score: float) -> list[str]:
    """What the model finds in banking77's test messages (customer questions without personal
    data; the shipped negatives come from its training split)."""
    texts = [json.loads(line)["text"] for line in
             open(HERE.parent / "examples/banking77/test.jsonl", encoding="utf-8")]
    found = [t[a:b] for t, spans in zip(texts, model.find(texts)) for a, b, _, p in spans
             if p >= min_score]
    print(f"banking77 test, {len(texts)} messages (score >= {min_score}): {len(found)} findings",
          found[:10], flush=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=pm.NER_EPOCHS)
    ap.add_argument("--swap-copies", type=int, default=pm.SWAP_COPIES)
    ap.add_argument("--lr", type=float, default=pm.NER_LR)
    ap.add_argument("--wnut17", choices=["yes", "no"], default="yes" if pm.WNUT17 else "no",
                    help="train on WNUT 2017's sentences too")
    ap.add_argument("--no-case-feature", action="store_true",
                    help="train without the case of each token as its token type")
    ap.add_argument("--plain-orgs", type=float, default=pm.PLAIN_ORGS,
                    help="share of swapped companies named with ordinary words")
    ap.add_argument("--min-scores", type=float, nargs="+", default=[pii.SCORE_THRESHOLD],
                    help="score the model's findings at or above each of these probabilities")
    ap.add_argument("--test", action="store_true")
    args = ap.parse_args()
    shipped = [json.loads(line) for line in pm.NER_TRAIN.open(encoding="utf-8")]
    rows = pm.training_rows(swap_copies=args.swap_copies,
                            shipped=[r for r in shipped if not held_out(r)],
                            wnut17=args.wnut17 == "yes", plain_orgs=args.plain_orgs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = pm.train_ner(Path(tmp) / "ner", rows, epochs=args.epochs, lr=args.lr,
                            case_feature=not args.no_case_feature,
                            on_epoch=lambda e, n, loss: print(f"epoch {e}/{n} loss {loss:.1f} "
                                                              f"{time.perf_counter() - t0:.0f} s",
                                                              flush=True))
        train_s = time.perf_counter() - t0
        model = pm.NameModel(path)
        lower = lambda rs: [dict(r, text=pm.lower_keep(r["text"])) for r in rs]  # noqa: E731
        valid = [r for r in shipped if held_out(r)]
        print(json.dumps({"settings": vars(args), "training_rows": len(rows),
                          "train_s": round(train_s)}))
        data = (pm.NER_TRAIN, pm.NER_NEGATIVES, pm.NER_WNUT17, TEST)
        seen = "".join(f.read_text(encoding="utf-8").lower()  # never a name in the data
                       for f in data if f.is_file())
        names = [n for n in PLAIN_COMPANIES if n.lower() not in seen]
        plain = plain_company_rows(valid, names)
        for min_score in args.min_scores:
            score(model, valid, "validation", min_score)
            score(model, plain, "validation, companies of ordinary words (recall only)", min_score)
            score(model, lower(valid), "validation-lower", min_score)
            false_alarms(model, min_score)
        wnut_test = HERE.parent.parent / "shared/data/wnut17/test.jsonl"
        if wnut_test.is_file():  # WNUT 2017's test sentences: its corporations and groups
            rows = [json.loads(line) for line in wnut_test.open(encoding="utf-8")]
            rows = [dict(r, entities=[dict(e, label=WNUT_GOLD.get(e["label"], e["label"]))
                                      for e in r["entities"]]) for r in rows]
            score(model, rows, "wnut17 test", pii.SCORE_THRESHOLD)
        if args.test:
            test = [json.loads(line) for line in TEST.open(encoding="utf-8")]
            score(model, test, "test", pii.SCORE_THRESHOLD)
            score(model, lower(test), "test-lower", pii.SCORE_THRESHOLD)


if __name__ == "__main__":
    main()
