"""The scoreboard on the shared banking77 set (77 intents): zero-shot, few-shot and many-shot
prompting and a LoRA fine-tune, all on the same 385 test rows, through `tuneloop.train`.

    python bench/banking77_full.py --data ../shared/data/banking77

A CPU takes hours for the fine-tune (3k rows x 2 epochs); a GPU takes minutes. Writes
bench/out/banking77_full.json and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "banking77")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--many-shot-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "banking77_full.json")
    args = parser.parse_args()
    recipe = recipe_from_dict({
        "task": "classify", "name": "banking77-full", "epochs": args.epochs,
        "data": {"train": str(args.data / "train.jsonl"), "test": str(args.data / "test.jsonl")},
        "baselines": ["zero-shot", "few-shot", "many-shot"],
        "many_shot_tokens": args.many_shot_tokens,
    })
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as ws:
        result = train(recipe, workspace=Path(ws), on_phase=lambda p: print(p, flush=True))
    result["wall_s"] = time.perf_counter() - started
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


def table(result: dict) -> str:
    rows = [*result["baselines"].items(), ("fine-tuned (LoRA)", result["test"])]
    lines = [f"## banking77_full ({time.strftime('%Y-%m-%d')}, {result['device']})", "",
             f"Shared banking77: 77 intents, {result['test']['n']} test rows, "
             f"{result['steps']} LoRA steps at {result['train_tokens_per_s']:.0f} real tokens/s; "
             f"whole run {result['wall_s']:.0f} s. Gate: {result['gate']['metric']} gain "
             f"{result['gate']['gain']:+.3f} over {result['gate']['best_baseline']}.", "",
             "| model | accuracy | macro-F1 | ms/request (batched) | $/1k requests | prompt tokens |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     f"{m['latency_ms_per_request']:.1f} | {m['cost_per_1k_requests']:.5f} | "
                     f"{m['prompt_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
