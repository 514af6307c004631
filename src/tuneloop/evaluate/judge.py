"""`tuneloop eval judge`: an LLM grades answers, and is itself checked.

Pointwise: each answer gets a 1-5 score and a reason against a rubric (with the reference
answer shown when there is one). Pairwise: two models' answers to the same input, asked in
both orders; a verdict that follows the position instead of the answer is counted as a flip
(position bias) and scored as a tie. The judge is evaluated too: its agreement with the task's
reference metric (is a high score given to right answers?) and, when given, with human scores.
Prompts are versioned: a result names the prompt id and the hash of its text, so a changed
prompt never mixes with old judgements. Requests go through the teachers' cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from tuneloop.errors import TuneloopError
from tuneloop.tasks import extract
from tuneloop.evaluate.compare import Scored, bootstrap_interval, row_scores
from tuneloop.synth.teacher import Ask, Cache, Teacher, Usage, ask_all, request_cache_path
from tuneloop.core.files import atomic_write

RUBRIC = ("correct (agrees with the reference answer when one is given), complete, and in the "
          "form the task asks for")
PROMPTS = {
    "pointwise-v1": (
        "You are an impartial judge. Grade the answer to the request on a scale from 1 (wrong "
        "or useless) to 5 (fully correct). Criteria: {rubric}. Reply with JSON only: "
        "{{\"score\": <1-5>, \"reason\": \"<one sentence>\"}}"),
    "pairwise-v1": (
        "You are an impartial judge. Two answers to the same request follow. Decide which one "
        "is better. Criteria: {rubric}. Ignore the order in which they are shown and their "
        "length. Reply with JSON only: {{\"winner\": \"A\" | \"B\" | \"tie\", \"reason\": "
        "\"<one sentence>\"}}"),
}
POINTWISE, PAIRWISE = "pointwise-v1", "pairwise-v1"


def prompt_version(prompt_id: str, rubric: str) -> dict:
    text = PROMPTS[prompt_id].format(rubric=rubric)
    return {"id": prompt_id, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "rubric": rubric}


def _json_field(text: str, key: str) -> str | None:
    """`key` from the first JSON object in a reply; None when there is none."""
    obj, ok = extract.parse(text, None)
    return str(obj[key]) if ok and key in obj else None


def _said(reply) -> str | None:
    """What the judge replied, kept (shortened) where no verdict could be read from it."""
    return reply.text[:300] if reply else None


def parse_score(text: str) -> tuple[int | None, str]:
    """(1-5 or None, reason) from a pointwise reply; a bare digit is accepted too."""
    value = _json_field(text, "score")
    match = re.search(r"[1-5]", value if value is not None else text)
    reason = _json_field(text, "reason") or ""
    return (int(match.group()) if match else None), reason


def parse_winner(text: str) -> str | None:
    """"A", "B", "tie" or None from a pairwise reply."""
    value = _json_field(text, "winner")
    value = (value if value is not None else text).strip().strip('."\'').lower()
    if value.startswith("tie"):
        return "tie"
    if value[:1] in ("a", "b") and (len(value) == 1 or not value[1].isalpha()):
        return value[:1].upper()
    return None


def inputs_by_line(scored: Scored, registry) -> dict[int, str]:
    """The request text of each test row, from the evaluation's registered dataset."""
    from tuneloop.evaluate.run_report import examples_by_line

    inputs = examples_by_line(scored.dataset, scored.task, registry)
    if not inputs:
        raise TuneloopError(f"the test file of {scored.name} is not on disk any more; the judge "
                            "needs the inputs")
    return inputs


def _answer(row: dict) -> str:
    return row["output"].strip()


def _reference(row: dict) -> str:
    gold = row.get("gold")
    return json.dumps(gold, ensure_ascii=False) if isinstance(gold, dict) else str(gold or "")


def _user(request: str, reference: str, answers: list[tuple[str, str]]) -> str:
    parts = [f"Request:\n{request}"]
    if reference:
        parts.append(f"Reference answer:\n{reference}")
    parts += [f"{name}:\n{text}" for name, text in answers]
    return "\n\n".join(parts)


def pointwise(judge: Teacher, scored: Scored, inputs: dict[int, str], cache: Cache,
              rubric: str = RUBRIC, human: dict[int, int] | None = None,
              use_reference: bool = True) -> dict:
    """Scores for every row of one evaluation, the mean with its interval, and how well the
    scores agree with the task metric (and with human scores when given)."""
    system = PROMPTS[POINTWISE].format(rubric=rubric)
    rows = [r for r in scored.rows if r["line"] in inputs]
    asks = [Ask.of([{"role": "system", "content": system},
                    {"role": "user", "content": _user(inputs[r["line"]],
                                                      _reference(r) if use_reference else "",
                                                      [("Answer", _answer(r))])}],
                   max_tokens=96) for r in rows]
    usage = Usage()
    replies = ask_all(judge, asks, cache, usage)
    judged = []
    for row, reply in zip(rows, replies):
        score, reason = parse_score(reply.text) if reply else (None, "")
        judged.append({"line": row["line"], "score": score, "reason": reason[:300]}
                      | ({} if score is not None else {"reply": _said(reply)}))
    valid = [j for j in judged if j["score"] is not None]
    scores = np.array([j["score"] for j in valid], dtype=float)
    low, high = bootstrap_interval(scores)
    by_line = {r["line"]: r for r in rows}
    metric = row_scores(scored.task, [by_line[j["line"]] for j in valid])
    result = {
        "mode": "pointwise", "model": scored.name, "evaluation": scored.evaluation,
        "judge": judge.describe(), "prompt": prompt_version(POINTWISE, rubric),
        "rows": len(judged), "unparsed": len(judged) - len(valid),
        "mean_score": float(scores.mean()) if len(scores) else None, "low": low, "high": high,
        "distribution": {str(k): int((scores == k).sum()) for k in range(1, 6)},
        "agreement_with_metric": agreement(scores, metric), "usage": usage.to_dict(),
        "judgements": judged,
    }
    if human:
        pairs = [(j["score"], human[j["line"]]) for j in valid if j["line"] in human]
        if pairs:
            a, h = np.array(pairs, dtype=float).T
            result["agreement_with_humans"] = {
                "rows": len(pairs), "exact": float((a == h).mean()),
                "within_one": float((np.abs(a - h) <= 1).mean()), "pearson": _pearson(a, h)}
    return result


def agreement(scores: np.ndarray, metric: np.ndarray) -> dict:
    """Does the judge score right answers high? Share of rows where "score >= 4" matches
    "metric >= 0.5", and the correlation of score and metric."""
    if len(scores) == 0:
        return {"rows": 0, "agreement": None, "pearson": None}
    return {"rows": int(len(scores)),
            "agreement": float(((scores >= 4) == (metric >= 0.5)).mean()),
            "pearson": _pearson(scores, metric)}


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def pairwise(judge: Teacher, first: Scored, second: Scored, inputs: dict[int, str],
             cache: Cache, rubric: str = RUBRIC, use_reference: bool = True) -> dict:
    """Which of two models answers each shared row better, asked in both orders."""
    if first.task != second.task or first.dataset != second.dataset:
        raise TuneloopError(f"{first.name} and {second.name} were not scored on the same test "
                            "set; the judge compares answers to the same inputs")
    system = PROMPTS[PAIRWISE].format(rubric=rubric)
    a_rows, b_rows = ({r["line"]: r for r in e.rows} for e in (first, second))
    lines = sorted(set(a_rows) & set(b_rows) & set(inputs))
    # The same answer twice is a tie; the judge is only asked where the answers differ.
    asked = [n for n in lines if _answer(a_rows[n]) != _answer(b_rows[n])]
    asks = []
    for n in asked:
        ref = _reference(a_rows[n]) if use_reference else ""
        for x, y in ((a_rows[n], b_rows[n]), (b_rows[n], a_rows[n])):
            asks.append(Ask.of([{"role": "system", "content": system},
                                {"role": "user", "content": _user(
                                    inputs[n], ref, [("Answer A", _answer(x)),
                                                     ("Answer B", _answer(y))])}], max_tokens=96))
    usage = Usage()
    replies = dict(zip(asked, zip(*[iter(ask_all(judge, asks, cache, usage))] * 2)))
    outcomes, flips, unparsed = [], 0, 0
    for n in lines:
        if n not in replies:
            outcomes.append({"line": n, "winner": "tie", "orders": [], "consistent": True})
            continue
        first_order, second_order = (parse_winner(r.text) if r else None for r in replies[n])
        if first_order is None or second_order is None:
            unparsed += 1
            outcomes.append({"line": n, "winner": None, "orders": [first_order, second_order],
                             "replies": [_said(r) for r in replies[n]]})
            continue
        # In the second order A is the second model: map both verdicts to the models.
        seen = [{"A": "first", "B": "second", "tie": "tie"}[first_order],
                {"A": "second", "B": "first", "tie": "tie"}[second_order]]
        consistent = seen[0] == seen[1]
        flips += (not consistent) and "tie" not in seen
        outcomes.append({"line": n, "winner": seen[0] if consistent else "tie",
                         "orders": [first_order, second_order], "consistent": consistent})
    decided = [o for o in outcomes if o["winner"] is not None]
    wins = np.array([1.0 if o["winner"] == "second" else 0.5 if o["winner"] == "tie" else 0.0
                     for o in decided])
    low, high = bootstrap_interval(wins)
    return {
        "mode": "pairwise", "first": first.name, "second": second.name,
        "judge": judge.describe(), "prompt": prompt_version(PAIRWISE, rubric),
        "rows": len(lines), "identical": len(lines) - len(asked), "unparsed": unparsed,
        "second_wins": sum(o["winner"] == "second" for o in decided),
        "first_wins": sum(o["winner"] == "first" for o in decided),
        "ties": sum(o["winner"] == "tie" for o in decided),
        "second_win_rate": float(wins.mean()) if len(wins) else None, "low": low, "high": high,
        # Of the rows the judge was asked about and answered readably.
        "position_flips": int(flips),
        "flip_rate": flips / (len(asked) - unparsed) if len(asked) > unparsed else None,
        "usage": usage.to_dict(), "judgements": outcomes,
    }


def run_judge(refs: list[str], judge_spec: dict, workspace: Path, rubric: str = RUBRIC,
              human_file: Path | None = None, limit: int | None = None,
              use_reference: bool = True) -> dict:
    """Judge one evaluation (pointwise) or two (pairwise); the result is also written to
    workspace/judgements/<name>.json."""
    from tuneloop.evaluate import compare as cmp
    from tuneloop.store import Registry
    from tuneloop.synth.recipe import TeacherSpec, make_teacher

    if len(refs) not in (1, 2):
        raise TuneloopError("give one run/evaluation (pointwise scores) or two (pairwise)")
    registry = Registry.open(workspace)
    entries = [cmp.load(ref, registry) for ref in refs]
    if limit:
        entries = [Scored(e.name, e.evaluation, e.dataset, e.task, e.rows[:limit])
                   for e in entries]
    inputs = inputs_by_line(entries[0], registry)
    judge = make_teacher(TeacherSpec.model_validate(judge_spec), registry)
    cache = Cache(request_cache_path(workspace))
    try:
        if len(entries) == 1:
            human = _read_human(human_file) if human_file else None
            result = pointwise(judge, entries[0], inputs, cache, rubric, human, use_reference)
        else:
            result = pairwise(judge, entries[0], entries[1], inputs, cache, rubric,
                              use_reference)
    finally:
        cache.close()
    folder = workspace / "judgements"
    folder.mkdir(parents=True, exist_ok=True)
    name = "-vs-".join(e.evaluation for e in entries) + f"-{result['prompt']['sha256'][:8]}"
    atomic_write(folder / f"{name}.json", json.dumps(result, indent=1, ensure_ascii=False))
    result["path"] = str(folder / f"{name}.json")
    return result


def _read_human(path: Path) -> dict[int, int]:
    """Human scores: JSONL rows {"line": N, "score": 1-5}."""
    out = {}
    for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            out[int(row["line"])] = int(row["score"])
        except (ValueError, KeyError, TypeError):
            raise TuneloopError(f"{path} line {i}: expected {{\"line\": N, \"score\": 1-5}}") \
                from None
    return out
