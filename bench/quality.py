"""The quality suite: the minimal recipe (nothing tuned per task) on every shared set that fits a
task kind, scored on its test split beside the best prompting baseline and published anchors.

    python bench/quality.py --sets banking77            # one set
    python bench/quality.py                             # every set whose data is present

Each set is one `tuneloop.train` run of the four-line recipe (base model, task, data, method
lora) with the set's test file; defaults decide everything else. Writes
bench/out/quality-<set>.json (the run's workspace, with every evaluation's predictions, is
kept in bench/out/quality-<set>/) and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from tuneloop import methods
from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# set -> (task, folder, published anchor for the same test split)
SETS = {
    "banking77": ("classify", "banking77", "0.93 accuracy (full data), 0.85 (10 per intent): "
                  "dual sentence encoders, Casanueva et al. 2020"),
    "sroie": ("extract", "sroie", "0.85 field F1 target (issue 24)"),
    "dolly_open_qa": ("chat", "dolly_open_qa", "ROUGE-L; no anchor for this model size"),
    "gsm8k": ("chat", "gsm8k", "final-number match; SmolLM2-135M-Instruct reports 1.4% (8-shot)"),
    "hh_rlhf_harmless": ("chat", "hh_rlhf_harmless", "preference accuracy against the start "
                         "point (DPO)"),
    "wnut17": ("extract", "wnut17", "entity F1 0.56 (BERTweet), ~0.60 the best reported"),
}
METHOD = {"hh_rlhf_harmless": "dpo"}  # preference pairs; every other set: the default, lora


def run_set(name: str, data: Path, out: Path, baselines: bool = True,
            extra: dict | None = None) -> dict:
    task, folder, anchor = SETS[name]
    recipe = recipe_from_dict({
        **(extra or {}),
        "task": task, "name": f"quality-{name}",
        "data": {"train": str(data / folder / "train.jsonl"),
                 "test": str(data / folder / "test.jsonl")},
        "method": METHOD.get(name, "lora"),
        # (the prompting baselines change nothing the run trains; off, they are not scored)
        **({} if baselines else {"baselines": []})})
    started = time.perf_counter()
    ws = out / f"quality-{name}"  # kept: every evaluation's predictions, for a later look
    shutil.rmtree(ws, ignore_errors=True)
    result = train(recipe, workspace=ws, on_phase=lambda p: print(p, flush=True))
    result.update(wall_s=time.perf_counter() - started, set=name, anchor=anchor, task=task,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"{os.cpu_count()} CPU cores",
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def row(result: dict) -> str:
    metric = methods.headline(result["method"], result["task"])
    test = result["test"]
    ci = test.get("ci95") or {}
    gate = result.get("gate") or {}
    best = gate.get("best_baseline")
    best_value = (result.get("baselines") or {}).get(best, {}).get(metric) if best else None
    calib = test.get("calibration") or {}
    memory = (f"{result['peak_gpu_mb']:.0f} GPU" if result.get("peak_gpu_mb")
              else f"{result['peak_rss_mb']:.0f} RSS")
    return (f"| {result['set']} | {metric} {test[metric]:.3f} [{ci.get('low', float('nan')):.3f}, "
            f"{ci.get('high', float('nan')):.3f}] | "
            f"{calib.get('ece', float('nan')):.3f} | "
            f"{best or '-'} {'' if best_value is None else f'{best_value:.3f}'} | "
            f"{result['steps']} | {result['train_tokens']:,} | {result['train_s'] / 60:.1f} | "
            f"{result['wall_s'] / 60:.1f} | {memory} | {result['anchor']} |")


def fields_table(result: dict) -> str:
    """An extraction run's test figures by field, with the abstention figures beneath."""
    test = result["test"]
    by_field = (test.get("ci95") or {}).get("by_field", {})
    lines = [f"| {result['set']} field | F1 [95% CI] | precision | recall | gold values |",
             "|---|---|---|---|---|"]
    for name, m in test["per_field"].items():
        ci = by_field.get(name, {})
        lines.append(f"| {name} | {m['f1']:.3f} [{ci.get('low', float('nan')):.3f}, "
                     f"{ci.get('high', float('nan')):.3f}] | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {m['gold_values']} |")
    lines.append(f"| all | {test['field_f1']:.3f} | {test['field_precision']:.3f} | "
                 f"{test['field_recall']:.3f} | |")
    extra = [f"valid JSON {test['json_valid_rate']:.3f}"]
    if "strict_field_f1" in test:
        extra.append(f"strict F1 (values as written) {test['strict_field_f1']:.3f}")
    if "empty_row_accuracy" in test:
        extra.append(f"empty-row accuracy {test['empty_row_accuracy']:.3f} "
                     f"({test['empty_rows']} of {test['n']} rows have nothing to extract)")
    if "hallucination_rate" in test:
        extra.append(f"hallucination rate {test['hallucination_rate']:.3f}")
    return "\n".join(lines) + "\n\n" + "; ".join(extra) + "\n"


def table(results: list[dict]) -> str:
    device = results[0]["device"]
    lines = [f"## quality ({time.strftime('%Y-%m-%d')}, {device})", "",
             "The minimal recipe (base model, task, data, method); everything else derived.",
             "", "| set | test metric [95% CI] | ECE | best baseline | updates | training tokens "
             "| training min | whole run min | peak MB | published anchor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    lines += ["\n" + fields_table(r) for r in results if r["task"] == "extract"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--no-baselines", action="store_true",
                        help="train and score the fine-tune only (baselines scored elsewhere)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe key beyond the minimal recipe, e.g. head=spans (the "
                        "row is then that recipe's, not the minimal one)")
    parser.add_argument("--no-forgetting", action="store_true",
                        help="skip the general-ability check (it changes nothing the run trains "
                        "or scores on the set; it adds its own minutes to the whole run)")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    if args.no_forgetting:
        extra["forgetting"] = {"enabled": False}
    results = []
    for name in args.sets.split(","):
        if not (args.data / SETS[name][1] / "train.jsonl").is_file():
            print(f"{name}: no data under {args.data}; skipped", flush=True)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_set(name, args.data, args.out, baselines=not args.no_baselines,
                         extra=extra)
        (args.out / f"quality-{name}.json").write_text(json.dumps(result, indent=2, default=str))
        results.append(result)
        print(row(result), flush=True)
    if results:
        print(table(results))


if __name__ == "__main__":
    main()
