"""Training methods side by side: LoRA, DoRA, QLoRA and full fine-tuning on the same data and
token budget, and `tuneloop estimate`'s memory prediction against each one's measured peak.

    python bench/methods.py --steps 20

Each method runs in its own process (its peak RSS, or peak GPU memory, is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "banking77" / "recipe.yaml"
METHODS = ["lora", "dora", "qlora", "full"]
GPU = torch.cuda.is_available()


def recipe_for(method: str, steps: int):
    from tuneloop.project import load_recipe

    # Enough epochs that every method runs exactly `steps` steps on the same batches.
    return load_recipe(RECIPE).model_copy(update={
        "method": method, "max_steps": steps, "epochs": 100, "eval_every": 10_000,
        "checkpoint_every": 10_000, "baselines": []})


def child(method: str, steps: int, out: Path) -> None:
    from tuneloop.data.splits import load_splits
    from tuneloop.train.methods import WEIGHTS as REGISTRY
    from tuneloop.train.sft import run_sft

    recipe = recipe_for(method, steps)
    splits = load_splits(recipe.data, recipe.task)
    result = run_sft(REGISTRY[method], recipe, splits, out / "run")
    stats = result["stats"]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if GPU
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (out / "result.json").write_text(json.dumps({
        "tokens": stats["train_tokens"], "tokens_per_s": stats["train_tokens_per_s"],
        "peak_mb": peak, "val_loss": stats["final_val_loss"],
        "trainable": stats["trainable_params"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "methods")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out / args.child)
        return
    from tuneloop.train.estimate import estimate

    predicted = {m["method"]: m for m in estimate(recipe_for("lora", args.steps),
                                                  methods=args.methods)["methods"]}
    results = {}
    for method in args.methods:
        (args.out / method).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                        "--out", str(args.out)], check=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        results[method] = json.loads((args.out / method / "result.json").read_text())
        print(method, results[method], flush=True)
    where = torch.cuda.get_device_name() if GPU else f"{os.cpu_count()} CPU cores"
    memory = "peak GPU MB" if GPU else "peak RSS MB"
    lines = [f"## methods ({time.strftime('%Y-%m-%d')}, {where})", "",
             f"SmolLM2-135M-Instruct on the banking77 demo subset, {args.steps} optimizer steps "
             "each on the same micro-batches; validation loss after those steps.", "",
             f"| method | trainable params | real tokens/s | {memory} | estimated MB | estimate error | val loss |",
             "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        guess = predicted[method]["peak_memory_gb"] * 1024
        lines.append(f"| {method} | {r['trainable'] / 1e6:.1f}M | {r['tokens_per_s']:.1f} | "
                     f"{r['peak_mb']:.0f} | {guess:.0f} | {100 * (guess - r['peak_mb']) / r['peak_mb']:+.0f}% | "
                     f"{r['val_loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    target = args.out.parent / ("methods_gpu.md" if GPU else "methods.md")
    target.write_text(text)


if __name__ == "__main__":
    main()
