"""chat: free-form replies; scored against the reference by ROUGE-L, BLEU, exact match and,
where the reference ends in a number, the final number (GSM8K-style) and its error; perplexity
is added by the runner."""

from __future__ import annotations

import re
from functools import cache

# The last number in a text: optional sign, thousands separators, decimals. GSM8K references
# end in "#### 72"; models write "The answer is $1,200." — both read as the last number.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@cache
def _rouge():
    """ROUGE-L scorer, imported on first use: rouge_score pulls in nltk and scipy (about two
    seconds), which every command that merely lists the tasks would otherwise pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    return list(example.messages)


def target(example, info=None) -> str:
    return example.answer


def parse(output: str, info) -> tuple[str, bool]:
    return output.strip(), True


def final_number(text: str) -> float | None:
    """The last number in `text` (after "####" when there is one), or None."""
    text = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def metrics(predictions: list[str], golds: list[str], valid: list[bool]) -> dict:
    """ROUGE-L F (mean over rows), corpus BLEU (sacrebleu, 0-100), exact match (case and
    spacing aside); on rows whose reference holds a number: final-number match, MAE and MSE
    (a reply with no number counts as a miss and is left out of the errors)."""
    import sacrebleu

    n = len(golds)
    scores = [_rouge().score(g, p)["rougeL"].fmeasure for p, g in zip(predictions, golds)]
    out = {"rouge_l": sum(scores) / n if n else 0.0,
           "bleu": sacrebleu.corpus_bleu(predictions, [golds]).score if n else 0.0,
           "exact_match": sum(_norm(p) == _norm(g) for p, g in zip(predictions, golds)) / n
           if n else 0.0, "n": n}
    numeric = [(final_number(p), final_number(g)) for p, g in zip(predictions, golds)]
    numeric = [(p, g) for p, g in numeric if g is not None]
    if numeric:
        answered = [(p, g) for p, g in numeric if p is not None]
        out["numeric_rows"] = len(numeric)
        out["numeric_match"] = sum(p is not None and abs(p - g) < 1e-6 for p, g in numeric) \
            / len(numeric)
        out["numeric_answered"] = len(answered)
        if answered:
            out["mae"] = sum(abs(p - g) for p, g in answered) / len(answered)
            out["mse"] = sum((p - g) ** 2 for p, g in answered) / len(answered)
    return out
