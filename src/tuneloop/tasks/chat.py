"""chat: free-form replies; scored by ROUGE-L against the reference (and perplexity in the runner)."""

from __future__ import annotations

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    return list(example.messages)


def target(example) -> str:
    return example.answer


def parse(output: str, info) -> tuple[str, bool]:
    return output.strip(), True


def metrics(predictions: list[str], golds: list[str], valid: list[bool]) -> dict:
    """Mean ROUGE-L F-measure of each reply against its reference."""
    scores = [_SCORER.score(g, p)["rougeL"].fmeasure for p, g in zip(predictions, golds)]
    return {"rouge_l": sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}
