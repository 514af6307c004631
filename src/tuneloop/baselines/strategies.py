"""The baseline strategies, an explicit registry, and the runner that records them.

Each strategy returns the shots to put in the prompt after the zero-shot instruction: one
list shared by every test row, or (similar-shot) one list per test row.
Results are kept in the registry by (base model, test data, train data, strategy), so the
gate of every later run on the same data reuses them instead of paying again.
"""

from __future__ import annotations

from pathlib import Path

from tuneloop import models, project, tasks
from tuneloop.baselines import shots as shots_lib
from tuneloop.data.formats import file_sha256, load_examples
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.runner import max_new_tokens, score
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry, new_id

# Many-shot prompts are capped below long contexts on CPUs: the prefix is computed once, but
# every generated token still attends over all of it (and its KV cache is copied per batch).
MANY_SHOT_TOKENS = 4096
FEW_SHOT_MAX = 16


def zero_shot(tokenizer, info, candidates, budget: int, test_rows):
    """No examples: the instruction alone (still a shared prefix, computed once)."""
    return []


def few_shot(tokenizer, info, candidates, budget: int, test_rows):
    """One example per label (classify, up to 16) or 4 examples, within the budget."""
    k = min(FEW_SHOT_MAX, len(info.labels)) if info.kind == "classify" else 4
    return shots_lib.fit(tokenizer, info, candidates, budget, limit=k)


def many_shot(tokenizer, info, candidates, budget: int, test_rows):
    """As many examples as fit the model's context (up to MANY_SHOT_TOKENS)."""
    return shots_lib.fit(tokenizer, info, candidates, budget)


def similar_shot(tokenizer, info, candidates, budget: int, test_rows):
    """As many examples as few-shot, but per test row: the training rows most similar to it
    (MiniLM embeddings). The prompts then differ per row, so there is no shared prefix."""
    k = len(few_shot(tokenizer, info, candidates, budget, test_rows))
    return per_row_shots(test_rows, candidates, k)


STRATEGIES = {"zero-shot": zero_shot, "few-shot": few_shot, "many-shot": many_shot,
              "similar-shot": similar_shot}
DEFAULT = ["zero-shot", "few-shot", "many-shot"]


def run_baselines(base_model: str, train: Path, test: Path, task: str,
                  strategies: list[str] | None = None, workspace: Path | None = None,
                  max_prompt_tokens: int = MANY_SHOT_TOKENS, seed: int = 0,
                  reuse_prefix: bool = True, rerun: bool = False, on_phase=None) -> dict[str, dict]:
    """Score each strategy on `test` (shots drawn from `train`); returns metrics by strategy."""
    strategies = strategies or list(DEFAULT)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise TuneloopError(f"unknown baseline strategy {unknown}; choose from {list(STRATEGIES)}")
    ws = workspace or project.workspace()
    registry = Registry.open(ws)
    train_rows, test_rows = load_examples(train, task), load_examples(test, task)
    test_ds = registry.add_dataset(file_sha256(test), str(test), len(test_rows), task)
    train_ds = registry.add_dataset(file_sha256(train), str(train), len(train_rows), task)
    info = tasks.describe(task, train_rows)
    # A result is reused only if it was scored with the same prompt budget and shot order.
    settings = {"max_prompt_tokens": max_prompt_tokens, "seed": seed}
    found = {} if rerun else registry.baselines(base_model, test_ds.id, train_ds.id, settings)
    results = {s: found[s] for s in strategies if s in found}
    missing = [s for s in strategies if s not in results]
    if not missing:
        return results
    lm, tok = models.load_model(base_model), models.load_tokenizer(base_model)
    candidates = shots_lib.ordered(shots_lib.pool(train_rows, test_rows), info, seed)
    _, suffixes = shots_lib.split_prompts(tok, shots_lib.prefix_messages(info, []), test_rows)
    longest = max(len(s) for s in suffixes)
    limit = min(models.context_length(base_model), max_prompt_tokens)
    budget = limit - longest - max_new_tokens(tok, test_rows, info)
    for strategy in missing:
        if on_phase:
            on_phase(f"baseline: {strategy}")
        shots = STRATEGIES[strategy](tok, info, candidates, budget, test_rows)
        result = score(lm, tok, test_rows, info, zero_shot=True, shots=shots,
                       reuse_prefix=reuse_prefix)
        result["metrics"]["settings"] = settings
        eval_id = new_id("ev")
        record_evaluation(registry, ws / "evaluations" / eval_id, result, model=base_model,
                          dataset=test_ds.id, train_dataset=train_ds.id, strategy=strategy,
                          task=task)
        results[strategy] = result["metrics"]
    return results


def per_row_shots(test_rows, candidates, k: int) -> list[list]:
    """The k candidates nearest to each test row's input, least similar first (the most similar
    example sits right before the question)."""
    from tuneloop.baselines.retrieve import nearest

    text = lambda e: " ".join(m["content"] for m in e.messages if m["role"] != "system")  # noqa: E731
    ranked = nearest([text(e) for e in test_rows], [text(c) for c in candidates], k)
    return [[candidates[i] for i in reversed(row)] for row in ranked]


def best(baselines: dict[str, dict], task: str) -> tuple[str, float]:
    """(strategy, headline metric) of the best baseline."""
    headline = tasks.HEADLINE[task]
    name = max(baselines, key=lambda s: baselines[s][headline])
    return name, baselines[name][headline]
