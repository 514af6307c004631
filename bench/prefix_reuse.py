"""Many-shot evaluation with and without reusing the shared prefix's KV cache, in one run.

Same model, same rows, same token sequences; the only difference is whether the many-shot
prefix is computed once (tuneloop's default) or again for every batch of test rows.

    python bench/prefix_reuse.py [--rows 24] [--budget 2048]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--budget", type=int, default=2048)
    args = parser.parse_args()

    from tuneloop import models, tasks
    from tuneloop.baselines import shots
    from tuneloop.tasks import prompts
    from tuneloop.baselines.strategies import many_shot
    from tuneloop.core.formats import load_examples
    from tuneloop.models.generate import generate_shared_prefix
    from tuneloop.evaluate.runner import max_new_tokens, prefix_batch_size

    data = ROOT / "examples" / "banking77"
    train = load_examples(data / "train.jsonl", "classify")
    test = load_examples(data / "test.jsonl", "classify")[: args.rows]
    info = tasks.describe("classify", train)
    tok = models.load_tokenizer("smollm2-135m-instruct")
    model = models.load_model("smollm2-135m-instruct")
    candidates = shots.ordered(shots.pool(train, test), info, 0)
    chosen = many_shot(tok, info, candidates, args.budget - 64, test)
    prefix = prompts.prefix_messages(info, chosen)
    prefix_ids, suffixes = prompts.split_prompts(tok, prefix, test)
    new = max_new_tokens(tok, test, info)
    batch = prefix_batch_size(model, len(prefix_ids))
    timings, replies = {}, {}
    for mode in ("reuse", "no reuse"):
        start = time.perf_counter()
        replies[mode], _ = generate_shared_prefix(model, tok, prefix_ids, suffixes, new,
                                                  batch_size=batch, reuse=mode == "reuse")
        timings[mode] = time.perf_counter() - start
    same = replies["reuse"] == replies["no reuse"]
    text = "\n".join([
        f"## prefix_reuse ({time.strftime('%Y-%m-%d')})", "",
        f"SmolLM2-135M-Instruct, many-shot banking77 subset: {len(chosen)} shots, "
        f"{len(prefix_ids)}-token shared prefix, {len(test)} test rows, batches of {batch}.", "",
        "| mode | seconds | rows/s |", "|---|---|---|",
        *[f"| {m} | {t:.1f} | {len(test) / t:.2f} |" for m, t in timings.items()], "",
        f"Speed-up from reuse: {timings['no reuse'] / timings['reuse']:.1f}x; "
        f"identical replies: {'yes' if same else 'NO'} ({sum(a == b for a, b in zip(replies['reuse'], replies['no reuse']))}/{len(test)}).",
        ""])
    print(text)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_reuse.md").write_text(text)


if __name__ == "__main__":
    main()
