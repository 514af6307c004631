"""Receipt field extraction (SROIE): a LoRA run against its zero- and few-shot baselines, per field.

    python bench/sroie.py --data ../shared/data/sroie [--train-rows 120] [--test-rows 100]

SROIE is research-use data: it is read from ../shared/data and never copied into the project;
the subsets this script writes stay under bench/out/sroie/ (ignored by git). The bundled
SmolLM2-135M-Instruct learns to return {"company", "date", "address", "total"} as JSON from a
receipt's OCR text (the first `--train-rows` training receipts, rank order); the run, its
zero-shot and few-shot baselines are scored on the first `--test-rows` test receipts. Reported:
per-field normalized match (case, spacing, number and date formats ignored) with 95% bootstrap
intervals, micro field P/R/F1, JSON validity, and the run against each baseline on the same
rows (`tuneloop eval compare`: paired difference of the per-row field F1, its interval and
p-value, receipts fixed and broken). Stages are cached in bench/out/sroie/state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("company", "date", "address", "total")


def subset(src: Path, dst: Path, n: int) -> Path:
    rows = [json.loads(line) for line in src.open()][:n]
    dst.write_text("".join(json.dumps({"text": r["text"], "fields": r["fields"]}) + "\n"
                           for r in rows))
    return dst


def per_field(rows: list[dict]) -> dict:
    """Normalized match per field with its 95% bootstrap interval, over the scored rows."""
    from tuneloop.evaluate.compare import bootstrap_interval
    from tuneloop.tasks.extract import normalize

    out = {}
    for name in FIELDS:
        hits = np.array([float(normalize((r["prediction"] or {}).get(name))
                               == normalize(r["gold"].get(name))) for r in rows])
        low, high = bootstrap_interval(hits)
        out[name] = {"match": float(hits.mean()), "low": low, "high": high}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sroie")
    parser.add_argument("--train-rows", type=int, default=120)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sroie")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TUNELOOP_HOME"] = str(out / "workspace")
    from tuneloop.evaluate import compare
    from tuneloop.project import recipe_from_dict
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    train_file = subset(args.data / "train.jsonl", out / "train.jsonl", args.train_rows)
    test_file = subset(args.data / "test.jsonl", out / "test.jsonl", args.test_rows)
    if "run" not in state:
        recipe = recipe_from_dict({
            "task": "extract", "name": "sroie", "epochs": args.epochs,
            "baselines": ["zero-shot", "few-shot"], "forgetting": {"enabled": False},
            "data": {"train": str(train_file), "test": str(test_file)}})
        started = time.perf_counter()
        result = train(recipe, workspace=out / "workspace",
                       on_phase=lambda p: print(f"[sroie] {p}", flush=True))
        state["run"] = {"id": result["run_id"], "train_tokens": result["train_tokens"],
                        "train_s": result["train_s"], "wall_s": time.perf_counter() - started}
        state_path.write_text(json.dumps(state, indent=2))
    registry = Registry.open(out / "workspace")
    run = compare.load(state["run"]["id"], registry)
    baselines = [compare.load(ev, registry) for ev in compare.gate_baselines(run, registry)]
    models = []
    for scored in [run, *baselines]:
        metrics = next(e.metrics for e in registry.evaluations() if e.id == scored.evaluation)
        models.append({"name": scored.name, "fields": per_field(scored.rows),
                       **{k: metrics[k] for k in ("field_f1", "field_precision", "field_recall",
                                                  "json_valid_rate")}})
    result = compare.compare([run, *baselines])  # each baseline against the run
    state.update(models=models, compare=result, device=f"{os.cpu_count()} CPU cores")
    state_path.write_text(json.dumps(state, indent=2, default=str))
    print(table(state, args))


def table(state: dict, args) -> str:
    r = state["run"]
    lines = [f"## sroie ({time.strftime('%Y-%m-%d')}, {state['device']})", "",
             f"Command: `python bench/sroie.py --train-rows {args.train_rows} --test-rows "
             f"{args.test_rows} --epochs {args.epochs:g}`. SmolLM2-135M-Instruct, LoRA on the "
             f"first {args.train_rows} shared training receipts ({r['train_tokens']:,} tokens, "
             f"{r['train_s']:.0f} s), scored with its baselines on the first {args.test_rows} "
             "test receipts. Per-field cells: normalized match [95% bootstrap interval].", "",
             "| model | " + " | ".join(FIELDS) + " | field P / R / F1 | valid JSON |",
             "|---|" + "---|" * (len(FIELDS) + 2)]
    for m in state["models"]:
        cells = [f"{m['fields'][f]['match']:.2f} [{m['fields'][f]['low']:.2f}, "
                 f"{m['fields'][f]['high']:.2f}]" for f in FIELDS]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + f" | {m['field_precision']:.2f} / "
                     f"{m['field_recall']:.2f} / {m['field_f1']:.2f} | "
                     f"{m['json_valid_rate']:.2f} |")
    c = state["compare"]
    lines += ["", f"Per-receipt field F1, {c['rows']} receipts (`tuneloop eval compare`):", "",
              "| baseline | run − baseline [95% CI] | p | receipts the run does better / worse |",
              "|---|---|---|---|"]
    for p in c["pairs"]:
        lines.append(f"| {p['model']} | {-p['difference']:+.3f} [{-p['high']:+.3f}, "
                     f"{-p['low']:+.3f}] | {p['p_value']:.3g} | {p['broken']} / {p['fixed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
