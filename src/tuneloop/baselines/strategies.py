"""The baseline strategies, an explicit registry, and the runner that records them.

Each strategy gets a `Setup` and returns either the shots to put after the zero-shot
instruction, one list shared by every test row (a prefix computed once), or one whole prompt
per test row (similar-shot, rag).
Results are kept in the registry by (base model, test data, train data, strategy, settings),
so the gate of every later run on the same data reuses them instead of paying again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneloop import models, project, tasks
from tuneloop.baselines import rag
from tuneloop.baselines import shots as shots_lib
from tuneloop.tasks import prompts
from tuneloop.core.formats import Example, file_sha256, load_examples
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.runner import max_new_tokens, score
from tuneloop.evaluate.store import record_evaluation
from tuneloop.store import Registry, new_id

# Many-shot prompts are capped below long contexts on CPUs: the prefix is computed once, but
# every generated token still attends over all of it (and its KV cache is copied per batch).
MANY_SHOT_TOKENS = 4096
FEW_SHOT_MAX = 16
RAG_PASSAGES = 4


@dataclass
class Setup:
    """What a strategy may use: the shot candidates (no test input among them), the test rows,
    the prompt budget in tokens (the test row's own turns and the reply already set aside),
    and the document passages (rag)."""

    tokenizer: object
    info: tasks.TaskInfo
    candidates: list[Example]
    test_rows: list[Example]
    budget: int
    passages: list[rag.Passage] | None = None
    k: int = RAG_PASSAGES


def zero_shot(setup: Setup):
    """No examples: the instruction alone (still a shared prefix, computed once)."""
    return []


def few_shot(setup: Setup):
    """One example per label (classify, up to 16) or 4 examples, within the budget."""
    info = setup.info
    k = min(FEW_SHOT_MAX, len(info.labels)) if info.labels else 4
    return shots_lib.fit(setup.tokenizer, info, setup.candidates, setup.budget, limit=k)


def many_shot(setup: Setup):
    """As many examples as fit the model's context (up to the recipe's many_shot_tokens)."""
    return shots_lib.fit(setup.tokenizer, setup.info, setup.candidates, setup.budget)


def similar_shot(setup: Setup):
    """As many examples as few-shot, but per test row: the training rows most similar to it
    (MiniLM embeddings). The prompts then differ per row, so there is no shared prefix."""
    k = len(few_shot(setup))
    rows = per_row_shots(setup.test_rows, setup.candidates, k)
    return [[*prompts.prefix_messages(setup.info, row), *_user_turns(e)]
            for e, row in zip(setup.test_rows, rows)]


def rag_strategy(setup: Setup):
    """The passages of the recipe's documents nearest to each test row, in its system message
    (as many of the k best as fit the budget)."""
    if not setup.passages:
        raise TuneloopError("the rag baseline needs a document collection: set data.documents "
                            "in the recipe (a folder of .txt/.md files or a .jsonl with \"text\")")
    queries = [" ".join(m["content"] for m in _user_turns(e)) for e in setup.test_rows]
    found = rag.retrieve(queries, setup.passages, setup.k)
    return [rag.fitted_prompt(setup.tokenizer, e, row, setup.info, setup.budget)
            for e, row in zip(setup.test_rows, found)]


STRATEGIES = {"zero-shot": zero_shot, "few-shot": few_shot, "many-shot": many_shot,
              "similar-shot": similar_shot, "rag": rag_strategy}
DEFAULT = ["zero-shot", "few-shot", "many-shot"]


def _user_turns(example: Example) -> list[dict]:
    return [m for m in example.messages if m["role"] != "system"]


def run_baselines(base_model: str, train: Path, test: Path, task: str,
                  strategies: list[str] | None = None, workspace: Path | None = None,
                  max_prompt_tokens: int = MANY_SHOT_TOKENS, seed: int = 0,
                  documents: Path | None = None, passages: int = RAG_PASSAGES,
                  reuse_prefix: bool = True, rerun: bool = False, on_phase=None,
                  fields=None) -> dict[str, dict]:
    """Score each strategy on `test` (shots drawn from `train`, passages from `documents`);
    returns metrics by strategy."""
    strategies = strategies or list(DEFAULT)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise TuneloopError(f"unknown baseline strategy {unknown}; choose from {list(STRATEGIES)}")
    ws = workspace or project.workspace()
    registry = Registry.open(ws)
    train_rows, test_rows = load_examples(train, task), load_examples(test, task)
    test_ds = registry.add_dataset(file_sha256(test), str(test), len(test_rows), task)
    train_ds = registry.add_dataset(file_sha256(train), str(train), len(train_rows), task)
    info = tasks.describe(task, train_rows, fields)
    collection = rag.load_passages(documents) if documents and "rag" in strategies else None
    # A result is reused only if it was scored with the same prompt budget and shot order
    # (and, for rag, the same documents and passage count).
    settings = {s: {"max_prompt_tokens": max_prompt_tokens, "seed": seed} for s in strategies}
    if fields:  # the recipe's fields change the prompt
        for s in strategies:
            settings[s]["fields"] = [f.model_dump() for f in fields]
    if collection:
        settings["rag"].update(documents=rag.collection_sha256(collection), passages=passages)
    found = {} if rerun else registry.baselines(base_model, test_ds.id, train_ds.id, settings)
    results = {s: found[s] for s in strategies if s in found}
    missing = [s for s in strategies if s not in results]
    if not missing:
        return results
    lm, tok = models.load_model(base_model), models.load_tokenizer(base_model)
    setup = make_setup(tok, base_model, info, train_rows, test_rows, max_prompt_tokens, seed,
                       collection, passages)
    for strategy in missing:
        if on_phase:
            on_phase(f"baseline: {strategy}")
        result = score(lm, tok, test_rows, info, zero_shot=True, reuse_prefix=reuse_prefix,
                       **prompting(strategy, setup))
        result["metrics"]["settings"] = settings[strategy]
        eval_id = new_id("ev")
        record_evaluation(registry, ws / "evaluations" / eval_id, result, model=base_model,
                          dataset=test_ds.id, train_dataset=train_ds.id, strategy=strategy,
                          task=task)
        results[strategy] = result["metrics"]
    return results


def make_setup(tok, base_model: str, info, train_rows, test_rows, max_prompt_tokens: int,
               seed: int, collection=None, passages: int = RAG_PASSAGES) -> Setup:
    """Shot candidates (no test input among them, in a seeded label-cycling order) and the
    prompt budget: the context (capped at max_prompt_tokens) less the longest test row's own
    turns and the longest expected reply."""
    candidates = shots_lib.ordered(shots_lib.pool(train_rows, test_rows), info, seed)
    _, suffixes = prompts.split_prompts(tok, prompts.prefix_messages(info, []), test_rows)
    limit = min(models.context_length(base_model), max_prompt_tokens)
    budget = limit - max(len(s) for s in suffixes) - max_new_tokens(tok, test_rows, info)
    return Setup(tok, info, candidates, test_rows, budget, collection, passages)


def prompting(strategy: str, setup: Setup) -> dict:
    """`score`'s keyword for a strategy: shared `shots`, or one of `prompts` per test row."""
    made = STRATEGIES[strategy](setup)
    per_row = bool(made) and isinstance(made[0], list)
    return {"prompts": made} if per_row else {"shots": made}


def recipe_baselines(recipe, strategies: list[str] | None = None, **options) -> dict[str, dict]:
    """`run_baselines` with a recipe's data and settings (its own strategies by default)."""
    if recipe.data.test is None:
        raise TuneloopError("baselines need data.test in the recipe (the held-out rows to score)")
    return run_baselines(recipe.base_model, recipe.data.train, recipe.data.test, recipe.task,
                         strategies or recipe.baselines, max_prompt_tokens=recipe.many_shot_tokens,
                         documents=recipe.data.documents, passages=recipe.rag_passages,
                         fields=recipe.fields, **options)


def per_row_shots(test_rows, candidates, k: int) -> list[list]:
    """The k candidates nearest to each test row's input, least similar first (the most similar
    example sits right before the question)."""
    from tuneloop.models.embed import nearest

    def text(e):
        return " ".join(m["content"] for m in _user_turns(e))

    ranked = nearest([text(e) for e in test_rows], [text(c) for c in candidates], k)
    return [[candidates[i] for i in reversed(row)] for row in ranked]


def best(baselines: dict[str, dict], task: str) -> tuple[str, float]:
    """(strategy, headline metric) of the best baseline."""
    headline = tasks.headline(task)
    name = max(baselines, key=lambda s: baselines[s][headline])
    return name, baselines[name][headline]
