"""A sweep around the default recipe, judged on the validation split only (the test set is not
read): each variant changes one derived setting of the minimal recipe.

    python bench/sweep.py --set banking77 --variants default,lr=5e-4,lr=2e-3,epochs=3,batch_size=32

A variant is `default` or KEY=VALUE for a recipe key (learning_rate as lr, lora rank as rank).
Writes bench/out/sweep-<set>.json and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = {"banking77": "classify", "sroie": "extract"}
ALIASES = {"lr": "learning_rate"}


def variant(spec: str) -> dict:
    if spec == "default":
        return {}
    key, value = spec.split("=", 1)
    key = ALIASES.get(key, key)
    if key == "rank":
        return {"lora": {"rank": int(value)}}
    for kind in (int, float):
        try:
            return {key: kind(value)}
        except ValueError:
            pass
    return {key: value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="banking77", choices=sorted(TASKS))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--variants", default="default,lr=5e-4,lr=2e-3,epochs=3")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    rows = []
    for spec in args.variants.split(","):
        recipe = recipe_from_dict({
            "task": TASKS[args.set], "name": f"sweep-{spec}", "method": "lora", "baselines": [],
            "forgetting": {"enabled": False},
            "data": {"train": str(args.data / args.set / "train.jsonl")}, **variant(spec)})
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as ws:
            result = train(recipe, workspace=Path(ws))
        row = {"variant": spec, "steps": result["steps"], "train_s": result["train_s"],
               "best_val_accuracy": result.get("best_val_accuracy"),
               "best_step": result.get("best_step"), "final_val_loss": result["final_val_loss"],
               "curve": result.get("val_accuracy_curve"), "wall_s": time.perf_counter() - started}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sweep-{args.set}.json").write_text(json.dumps(rows, indent=2))
    print("| variant | updates | best validation accuracy (step) | final val loss | training min |\n"
          "|---|---|---|---|---|")
    for r in rows:
        acc = r["best_val_accuracy"]
        print(f"| {r['variant']} | {r['steps']} | "
              f"{'-' if acc is None else f'{acc:.3f}'} ({r['best_step']}) | "
              f"{r['final_val_loss']:.3f} | {r['train_s'] / 60:.1f} |")


if __name__ == "__main__":
    main()
