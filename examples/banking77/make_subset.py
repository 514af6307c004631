"""Rebuild the shipped banking77 subset from the shared extract (documents its provenance).

Usage: python examples/banking77/make_subset.py ../shared/data/banking77
Twelve clearly distinct intents; per intent the first 28 training rows (in the extract's
rank-key order) go to train.jsonl, and the other training rows plus the 5 official test rows
go to test.jsonl, so the test split is large enough for accuracy to mean something.
"""

import json
import sys
from pathlib import Path

LABELS = [
    "activate_my_card", "age_limit", "apple_pay_or_google_pay", "atm_support", "card_arrival",
    "change_pin", "country_support", "exchange_rate", "lost_or_stolen_card",
    "terminate_account", "transfer_timing", "verify_my_identity",
]
TRAIN_PER_LABEL = 28


def main(source: Path, out: Path) -> None:
    rows = [json.loads(line) for line in (source / "train.jsonl").open()]
    test_rows = [json.loads(line) for line in (source / "test.jsonl").open()]
    train, test, seen = [], [], {}
    for row in rows:
        if row["label"] not in LABELS:
            continue
        seen[row["label"]] = seen.get(row["label"], 0) + 1
        (train if seen[row["label"]] <= TRAIN_PER_LABEL else test).append(row)
    test += [row for row in test_rows if row["label"] in LABELS]
    for name, split in (("train", train), ("test", test)):
        with (out / f"{name}.jsonl").open("w") as f:
            for row in split:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
    print(f"train {len(train)} rows, test {len(test)} rows, {len(LABELS)} labels")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)
