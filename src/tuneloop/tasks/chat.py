"""chat: free-form replies; scored against the reference by ROUGE-L, BLEU, exact match and,
where the reference ends in a number, the final number (GSM8K-style) and its error; perplexity
is added by the runner."""

from __future__ import annotations

import dataclasses
import re
from functools import cache

from tuneloop.tasks.info import TaskInfo, answer_room, shuffled

HEADLINE = "rouge_l"
COLUMNS = ["rouge_l", "perplexity"]  # the terminal's table of an evaluation
ROW_HEADLINE = HEADLINE
PAIRED_EXACT = False
REFERENCE_LOSS = True  # the runner adds the perplexity of the reference answers
HEADS = ("none",)  # the recipe's `head` choices, the default first
LOSSES = ("tokens",)  # the recipe's `loss` choices, the default first


def default_head(info) -> str:
    """The head a run trains when its recipe names none: none, it writes its answer."""
    return HEADS[0]


# The last number in a text: optional sign, thousands separators, decimals. GSM8K references
# end in "#### 72"; models write "The answer is $1,200." — both read as the last number.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@cache
def _rouge():
    """ROUGE-L scorer, imported on first use: rouge_score pulls in nltk and scipy (about two
    seconds), which every command that merely lists the tasks would otherwise pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def describe(examples, fields=None) -> TaskInfo:
    """Chat learns nothing to keep beyond its kind."""
    return TaskInfo("chat")


def prompt(example, info, zero_shot: bool = False) -> list[dict]:
    """The conversation as it is."""
    return list(example.messages)


def target(example, info=None) -> str:
    """The reference reply."""
    return example.answer


def gold(example, info) -> str:
    """What a reply is scored against: the reference."""
    return example.answer


def with_answer(example, reply: str, info):
    """The example answered by a teacher's reply (kept as it was when the reply is empty)."""
    return dataclasses.replace(example, answer=reply or example.answer)


def shot_order(candidates: list, seed: int) -> list:
    """A seeded shuffle."""
    return shuffled(candidates, seed)


def max_new_tokens(tokenizer, examples, info) -> int:
    """Room for the longest reference, with a margin."""
    return answer_room(tokenizer, [e.answer for e in examples])


def grammar(model, tokenizer, info):
    """None: chat is free text."""
    return None


def answer_schema(info) -> None:
    """None: free text."""
    return None


def decide(model, tokenizer, prompts, info, on_batch=None, prefix=None, batch_size: int = 16,
           messages=None):
    """None: the model writes its answer (there is no set of answers to decide among)."""
    return None


def value_confidences(rows: list[dict]) -> None:
    """None: a row's confidence is its answer's (the runner's calibration)."""
    return None


def row_score(row: dict) -> float:
    """One reply's ROUGE-L F against its reference."""
    return _rouge().score(row["gold"], row["prediction"] or "")["rougeL"].fmeasure


def value_counts_table(rows: list[dict]):
    """None: ROUGE-L's interval is a bootstrap of the row scores."""
    return None


def shared_extras(rows: list[dict]) -> dict:
    """Nothing beyond the headline for compare's table."""
    return {}


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


def metrics(predictions: list[str], golds: list[str], valid: list[bool], examples=None) -> dict:
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


# Synthesis (tuneloop synth): what a teacher is asked for and how its reply becomes a row.

SYNTH_MODES = ("answer", "expand", "preferences")  # the synth modes, the usual one first
SYNTH_CONSENSUS = False  # one reply per input: free replies do not agree word for word
EXPAND_BY_LABEL = False  # expand writes inputs from all seeds alike; nothing to verify
OWN_SYSTEM_TURN = False  # prompt() is the conversation as it is: an instruction goes first


def synth_info(recipe, seeds: list[dict], trained) -> TaskInfo:
    """Chat needs nothing beyond its kind to ask a teacher."""
    return TaskInfo("chat")


def synth_max_tokens(limit: int, info) -> int:
    """A teacher's longest reply: the teacher spec's limit."""
    return limit


def synth_answer(text: str, info) -> tuple[object, str | None]:
    """(the teacher's reply, None): any non-empty reply is an answer."""
    return text, None


def synth_row(messages: list[dict], answer) -> dict:
    """The dataset row: the conversation with the teacher's reply appended."""
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}
