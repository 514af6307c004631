"""Logit-level against sequence-level distillation, on the same data and token budget.

    python bench/distill.py            (after bench/synth_banking77.py has trained its teacher)

The teacher is bench/synth_banking77.py's LoRA run (25 gold rows per banking77 intent). Two
students (fresh LoRA on the same base, so the tokenizer is shared) learn from it on the 770
gold inputs (10 per intent), with the teacher's answers as targets: one from those answers only
(`distill: {mode: sequence}`), one also from the teacher's token distributions
(`mode: logits`, top-50 KL, weight 0.5). Same seed, same batches, same steps, so the same
tokens (30 steps by default, to fit a CPU session). Reported: the students' validation KL to the teacher (whole vocabulary, per answer
token), validation loss on the teacher's answers, test accuracy, and training speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "banking77")
    parser.add_argument("--synth", type=Path, default=ROOT / "bench" / "out" / "synth_banking77")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=30, help="the same cap for both")
    parser.add_argument("--test", action="store_true", help="also score both on the test set")
    args = parser.parse_args()
    state = json.loads((args.synth / "state.json").read_text())
    ws = args.synth / "workspace"
    os.environ["TUNELOOP_HOME"] = str(ws)
    out = args.synth / "distill.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for mode in ("sequence", "logits"):
        if mode in results:
            continue
        data = {"train": str(args.synth / "gold.jsonl")}
        if args.test:
            data["test"] = str(args.data / "test.jsonl")
        recipe = recipe_from_dict({
            "task": "classify", "name": f"b77-distill-{mode}", "method": "distill",
            "epochs": args.epochs, "max_steps": args.max_steps, "baselines": [],
            "forgetting": {"enabled": False},
            "distill": {"teacher": state["teacher"]["run_id"], "mode": mode}, "data": data})
        started = time.perf_counter()
        r = train(recipe, workspace=ws, on_phase=lambda p: print(f"[{mode}] {p}", flush=True))
        results[mode] = {k: r.get(k) for k in ("run_id", "final_val_kl", "final_val_loss",
                                               "accuracy", "macro_f1", "steps", "train_tokens",
                                               "train_s", "train_tokens_per_s")}
        results[mode]["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=2))
    print(table(results, state))


def table(results: dict, state: dict) -> str:
    s, lg = results["sequence"], results["logits"]
    lines = [f"## distill ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores)", "",
             "Teacher: the synth_banking77 LoRA run (test accuracy "
             f"{state['teacher']['accuracy']:.3f}). Students: fresh LoRA on SmolLM2-135M, 770 "
             f"banking77 inputs (10 per intent) with the teacher's answers, {s['steps']} steps "
             f"and {s['train_tokens']:,} tokens each; validation: the deterministic 10% slice "
             "(77 rows), KL over the whole vocabulary per answer token.", "",
             "| distillation | val KL to teacher | val loss (teacher's answers) | test accuracy | "
             "train s | tokens/s |", "|---|---|---|---|---|---|"]
    for name, r in (("sequence (answers only)", s), ("logits (top-50 KL + answers)", lg)):
        accuracy = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"| {name} | {r['final_val_kl']:.4f} | {r['final_val_loss']:.4f} | "
                     f"{accuracy} | {r['train_s']:.0f} | {r['train_tokens_per_s']:.0f} |")
    lines += ["", f"Logit distillation: validation KL {lg['final_val_kl'] / s['final_val_kl']:.2f}x "
              f"of sequence-level at the same token budget; each step also runs the teacher "
              f"forward ({lg['train_tokens_per_s'] / s['train_tokens_per_s']:.2f}x the tokens/s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
