"""DPO on Anthropic's hh-rlhf harmlessness pairs: does preference training raise how often the
model gives the chosen reply more probability than the rejected one, on held-out pairs?

    python bench/dpo.py --data ../shared/data/hh_rlhf_harmless [--lr 5e-5] [--epochs 1]

Runs `tuneloop.train` with method: dpo (a LoRA policy on SmolLM2-135M-Instruct, the base model
as the reference) and prints a Markdown table for bench/RESULTS.md. Minutes on a GPU; hours on
a 2-core CPU for the full 1,803 training pairs (use --pairs to take fewer).
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
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hh_rlhf_harmless")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--pairs", type=int, default=None, help="use the first N training pairs")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "dpo.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train_file = args.data / "train.jsonl"
        if args.pairs:
            train_file = Path(tmp) / "train.jsonl"
            rows = (args.data / "train.jsonl").read_text().splitlines()[: args.pairs]
            train_file.write_text("\n".join(rows) + "\n")
        recipe = recipe_from_dict({
            "task": "chat", "method": "dpo", "name": "hh-dpo", "epochs": args.epochs,
            "max_length": args.max_length, "learning_rate": args.lr, "dpo": {"beta": args.beta},
            "data": {"train": str(train_file), "test": str(args.data / "test.jsonl")}})
        started = time.perf_counter()
        result = train(recipe, workspace=Path(tmp) / "ws", on_phase=lambda p: print(p, flush=True))
    result["wall_s"] = time.perf_counter() - started
    result["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                        else f"{os.cpu_count()} CPU cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    t = result["test"]
    print(f"## dpo ({time.strftime('%Y-%m-%d')}, {result['device']})\n\n"
          f"hh-rlhf harmless-base, {t['n']} held-out pairs; LoRA DPO on SmolLM2-135M-Instruct, "
          f"beta {args.beta}, lr {args.lr or 'default 5e-5'}, {result['steps']} steps over "
          f"{args.pairs or 1803} pairs (max {args.max_length} tokens), "
          f"{result['train_tokens_per_s']:.0f} tokens/s; whole run {result['wall_s']:.0f} s.\n\n"
          "| model | preference accuracy (logp chosen > rejected) | mean logp margin | "
          "reward accuracy | DPO loss |\n|---|---|---|---|---|\n"
          f"| start point (base) | {t['start_preference_accuracy']:.3f} | – | – | 0.693 |\n"
          f"| after DPO | {t['preference_accuracy']:.3f} | {t['mean_logp_margin']:.2f} | "
          f"{t['reward_accuracy']:.3f} | {t['dpo_loss']:.3f} |\n")


if __name__ == "__main__":
    main()
