"""How a span head's pass should read its text (models/spans.py, `span_context`): the three
reads trained alike and judged on the validation split only, never the test file.

    python bench/span_context.py                          # WNUT 2017, one epoch each
    python bench/span_context.py --epochs 3 --contexts bidirectional,echo
    python bench/span_context.py --contexts generative   # the written-JSON path, alike

Each run is the minimal recipe (base model, task extract, data, method lora) with `head: spans`
and one `span_context`; the split, seed, schedule and learning rate are the same for all.
Prints a Markdown table (validation field F1 at each validation, the best, training time and
tokens) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wnut17"


def run(context: str, epochs: float, data: Path, out: Path) -> dict:
    """One run; `context` "generative" is the written-JSON path (head: none), its validation
    field F1 scored once at the end as eval decodes (under the fields' schema)."""
    head = {"head": "none"} if context == "generative" else {"head": "spans",
                                                            "span_context": context}
    recipe = recipe_from_dict({
        "task": "extract", "name": f"span-{context}", "method": "lora",
        "data": {"train": str(data / "train.jsonl")},  # (no test file: validation only)
        **head, "epochs": epochs, "baselines": [], "forgetting": {"enabled": False}})
    ws = out / f"span-context-{context}"
    shutil.rmtree(ws, ignore_errors=True)
    started = time.perf_counter()
    result = train(recipe, workspace=ws, on_phase=lambda p: print(context, p, flush=True))
    if context == "generative":
        from tuneloop import models
        from tuneloop.data.splits import load_splits
        from tuneloop.evaluate.runner import score
        from tuneloop.models import load_artifact

        splits = load_splits(recipe.data, "extract")
        model, _ = load_artifact(ws / "runs" / result["run_id"] / "adapter")
        scored = score(model, models.load_tokenizer(recipe.base_model), splits.validation,
                       splits.info)["metrics"]
        result.update(best_val_metric=scored["field_f1"],
                      val_metric_curve=[(result["steps"], scored["field_f1"])])
    return {"context": context, "wall_s": time.perf_counter() - started, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--contexts", default="bidirectional,echo,causal")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| span_context | best validation field F1 | at update | validation F1 by update "
             "| updates | training tokens | training min |", "|---|---|---|---|---|---|---|"]
    for context in args.contexts.split(","):
        r = run(context, args.epochs, args.data, args.out)
        (args.out / f"span-context-{context}.json").write_text(json.dumps(r, indent=2,
                                                                          default=str))
        curve = r.get("val_metric_curve") or []
        lines.append(f"| {context} | {r['best_val_metric']:.3f} | {r.get('best_step')} | "
                     + ", ".join(f"{s}: {f:.3f}" for s, f in curve)
                     + f" | {r['steps']} | {r['train_tokens']:,} | {r['train_s'] / 60:.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
