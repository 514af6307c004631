"""Sharded (FSDP, DeepSpeed ZeRO-2 and ZeRO-3) against plain data-parallel (DDP) training, two
processes on this machine, full fine-tuning of the bundled SmolLM2-135M on the banking77 demo
data: per-process peak memory, real tokens/s, and the training loss after the same steps (which
must agree: the same global batch, only where the weights and their state live differs).

    python bench/sharding.py --steps 4 [--processes 2] [--method full] [--modes one,ddp,fsdp,...]

All run through `tuneloop.train.distributed.launch`, as `tuneloop train RECIPE --processes 2
[--fsdp | --deepspeed zero2|zero3]` does; the figures are rank 0's (the ranks are symmetric).
"one" is the same steps in one process (all cores, the same global batch), as `tuneloop train
RECIPE` runs them: what the processes gain or lose on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "banking77" / "recipe.yaml"


def _one_process(recipe, run_dir: Path) -> dict:
    """The loop's stats in this (fresh) process: its peak RSS is the run's alone."""
    from tuneloop.data.splits import load_splits
    from tuneloop.train.methods import WEIGHTS
    from tuneloop.train.sft import run_sft

    splits = load_splits(recipe.data, recipe.task)
    return run_sft(WEIGHTS[recipe.method], recipe, splits, run_dir)["stats"]


def main() -> None:
    from tuneloop.train.estimate import estimate
    from tuneloop.project import load_recipe
    from tuneloop.train.distributed import launch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--method", default="full")
    parser.add_argument("--modes", default="one,ddp,fsdp,zero2,zero3")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE).model_copy(update={
        "method": args.method, "max_steps": args.steps, "epochs": 100,
        "eval_every": 10_000, "checkpoint_every": 10_000, "baselines": []})
    results = {}
    for mode in args.modes.split(","):
        sharding = None if mode in ("one", "ddp") else mode
        processes = 1 if mode == "one" else args.processes
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            if mode == "one":  # the same updates, every micro-batch in one process
                alone = recipe
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    stats = pool.submit(_one_process, alone, Path(tmp)).result()
                stats.update(ranks_identical=None)
            else:
                stats = launch(recipe, Path(tmp), processes, sharding=sharding)
            results[mode] = {**stats, "wall_s": time.perf_counter() - started}
            guess = estimate(recipe, methods=[args.method], processes=processes,
                             sharding=sharding, workspace=Path(tmp) / "ws")["methods"][0]
            results[mode]["estimated_mb"] = guess["peak_memory_gb"] * 1024
        print(mode, json.dumps({k: results[mode][k] for k in (
            "train_tokens_per_s", "training_peak_rss_mb", "peak_rss_mb", "final_train_loss",
            "params_held_per_rank",
            "ranks_identical", "wall_s", "estimated_mb")}), flush=True)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{os.cpu_count()} CPU cores"
    lines = [f"## sharding ({time.strftime('%Y-%m-%d')}, {where})", "",
             f"Command: `python bench/sharding.py --steps {args.steps} --processes "
             f"{args.processes} --method {args.method} --modes {args.modes}`. "
             f"{args.method} fine-tuning of "
             f"SmolLM2-135M-Instruct on the banking77 demo subset, {args.steps} optimizer steps, "
             f"{args.processes} processes (gloo on CPUs), the same micro-batches.", "",
             "| mode | weights held per process | peak RSS per process while training, MB | "
             "`tuneloop estimate`, MB | estimate error | peak RSS with saving, MB | "
             "real tokens/s | train loss after the steps | ranks identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        held = r.get("params_held_per_rank")
        lines.append(f"| {mode} | {f'{held / 1e6:.1f}M' if held else 'all'} | "
                     f"{r['training_peak_rss_mb']:.0f} | {r['estimated_mb']:.0f} | "
                     f"{100 * (r['estimated_mb'] / r['training_peak_rss_mb'] - 1):+.0f}% | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{r['train_tokens_per_s']:.1f} | "
                     f"{r['final_train_loss']:.6f} | {r['ranks_identical']} |")
    ddp = results.get("ddp")
    lines.append("")
    for mode, r in results.items():
        if ddp and mode != "ddp":  # (one: one process against the processes, unsharded)
            lines.append(f"- {mode} / ddp: peak memory while training "
                         f"{r['training_peak_rss_mb'] / ddp['training_peak_rss_mb']:.2f}x, tokens/s "
                         f"{r['train_tokens_per_s'] / ddp['train_tokens_per_s']:.2f}x; loss "
                         f"difference {abs(r['final_train_loss'] - ddp['final_train_loss']):.2e}.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
