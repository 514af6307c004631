"""The LLM judge checked on a fixed set: position bias (verdicts that flip with the order),
and agreement of pointwise scores with the task metric.

    python bench/judge_bias.py [--judge smollm2-135m-instruct] [--rows 60]

The fixed set: the first `--rows` rows of the shared banking77 test set, answered by the two
students of bench/synth_banking77.py (10 gold rows per intent, and the same plus synthetic
labels). The judge is a local model through `tuneloop eval judge`'s code path; any
OpenAI-compatible endpoint can take its place (`--endpoint URL --judge NAME`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tuneloop.evaluate.judge import run_judge

ROOT = Path(__file__).resolve().parents[1]


def f(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synth", type=Path, default=ROOT / "bench" / "out" / "synth_banking77")
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--rows", type=int, default=60)
    args = parser.parse_args()
    state = json.loads((args.synth / "state.json").read_text())
    ws = args.synth / "workspace"
    os.environ["TUNELOOP_HOME"] = str(ws)
    spec = {"endpoint": args.endpoint, "model": args.judge}
    a, b = state["gold_only"]["run_id"], state["gold_synth"]["run_id"]
    started = time.perf_counter()
    pair = run_judge([a, b], spec, ws, limit=args.rows)
    point = run_judge([b], spec, ws, limit=args.rows)
    wall = time.perf_counter() - started
    out = {"pairwise": {k: v for k, v in pair.items() if k != "judgements"},
           "pointwise": {k: v for k, v in point.items() if k != "judgements"}, "wall_s": wall}
    (args.synth / "judge_bias.json").write_text(json.dumps(out, indent=2))
    p, q = out["pairwise"], out["pointwise"]
    agree = q["agreement_with_metric"]
    flip = p["flip_rate"]
    print(f"## judge_bias ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores)\n\n"
          f"Judge `{args.judge}` (prompts {p['prompt']['id']}, {q['prompt']['id']}) on the first "
          f"{p['rows']} banking77 test rows; {wall:.0f} s.\n\n"
          f"- Pairwise, student + synthetic labels vs student on gold only: {p['identical']} "
          f"rows answered alike (ties, not asked); of the {p['rows'] - p['identical']} asked in "
          f"both orders, {p['unparsed']} unreadable, and the verdict **flipped with the order in "
          f"{p['position_flips']} ({'n/a' if flip is None else f'{flip:.0%}'})** — "
          + ("no verdict was readable, so this judge cannot be used; " if flip is None else
             f"{'within' if flip <= 0.10 else 'beyond'} the 10% a judge should stay under. ")
          + f"Win rate of the synthetic-label student "
          f"{f(p['second_win_rate'])} ({f(p['low'])}–{f(p['high'])}).\n"
          f"- Pointwise on the synthetic-label student: mean score {f(q['mean_score'], '.2f')} "
          f"({q['unparsed']} unreadable); \"score ≥ 4\" agrees with right/wrong on "
          f"{f(agree['agreement'], '.0%')} of rows (Pearson {f(agree['pearson'])}).\n")


if __name__ == "__main__":
    main()
