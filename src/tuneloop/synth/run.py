"""`tuneloop synth RECIPE.yaml`: a teacher labels, answers, expands or ranks, filters keep what
can be trusted, and the result is a dataset version with the teacher in its lineage.

Modes:
  label        unlabeled inputs get a label (classify) or fields (extract), validated against
               the label set / field names; optional self-consistency over several samples.
  answer       instructions get the teacher's reply (SFT pairs).
  expand       new inputs written from a few seed examples at a time (self-instruct), filtered
               for near-duplicates of the seeds and of each other, then labelled or answered
               (for classification, only those the teacher labels as intended are kept).
  preferences  two sampled replies per instruction and a judge's choice (DPO pairs).
Filters: the answer's validity, agreement across samples, an LLM judge's 1-5 score, and
near-duplicates of existing data (`dedup_against`) or of test sets (`check_against`).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from tuneloop import tasks
from tuneloop.data import clean as cleaning
from tuneloop.data.curate import prepare
from tuneloop.data.prepare_recipe import InputSpec, PrepareRecipe
from tuneloop.data.dedup import NearDuplicates, exact_digest
from tuneloop.core.formats import Example, parse_row, prompt_messages
from tuneloop.data.ingest import read_rows
from tuneloop.data.rows import prompt_text
from tuneloop.errors import TuneloopError
from tuneloop.synth.recipe import SynthRecipe, make_teacher
from tuneloop.synth.teacher import Ask, Cache, Teacher, Usage, ask_all, request_cache_path
from tuneloop.tasks import TaskInfo

JUDGE_SYSTEM = ("You grade answers. Rate how well the answer serves the request: correct, "
                "complete, clear. Reply with one digit from 1 (useless) to 5 (excellent).")
PAIR_SYSTEM = ("You compare two answers to the same request. Reply with the letter of the "
               "better one, A or B, and nothing else.")
EXPAND_SYSTEM = ("You write realistic new examples for a dataset. Reply with one example per "
                 "line and nothing else: no numbering, no quotes, no comments.")
EXAMPLES_PER_REASON = 5


class Filters:
    """Why rows were dropped, with a few examples of each reason."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: list[dict] = []

    def drop(self, reason: str, text: str, **extra) -> None:
        self.counts[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < EXAMPLES_PER_REASON:
            self.examples.append({"reason": reason, "text": text[:300], **extra})


def _read(specs: list[InputSpec], task: str, labelled: bool) -> list[dict]:
    """Rows of the input files; labelled rows are validated as the task's training rows."""
    rows = []
    for spec in specs:
        for line, row, problem in read_rows(spec.path, spec.mapping):
            if problem is not None:
                raise TuneloopError(f"{spec.path} line {problem.line}: {problem.code}: "
                                    f"{problem.message}")
            if labelled:
                _, _, found = parse_row(row, line, task)
                if found:
                    raise TuneloopError(f"{spec.path} line {line}: {found[0].code}: "
                                        f"{found[0].message}")
            elif input_messages(row) is None:
                raise TuneloopError(f"{spec.path} line {line}: no input: give \"text\", "
                                    "\"prompt\" or \"messages\"")
            rows.append(row)
    return rows


def input_messages(row: dict) -> list[dict] | None:
    """The conversation to answer: a text, a prompt, or messages without the final reply."""
    if isinstance(row.get("text"), str) and row["text"].strip():
        return [{"role": "user", "content": row["text"].strip()}]
    if "prompt" in row:
        return prompt_messages(row["prompt"])
    messages = row.get("messages")
    if isinstance(messages, list):
        turns = prompt_messages([m for m in messages if isinstance(m, dict)])
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        return turns or None
    return None


def _task_info(recipe: SynthRecipe, seeds: list[dict], teacher: Teacher) -> TaskInfo:
    """What the teacher answers for (the label set, the field names): the task module's
    `synth_info`, from the recipe, the seeds or a teacher run trained on the task."""
    trained = teacher.trained_for if getattr(teacher.trained_for, "kind", None) == recipe.task \
        else None
    return tasks.module(recipe.task).synth_info(recipe, seeds, trained)


def _prompt(recipe: SynthRecipe, info: TaskInfo, teacher: Teacher, messages: list[dict]
            ) -> list[dict]:
    """What the teacher is asked: the task's prompt (the one a teacher run was trained on,
    else the zero-shot prompt that names the labels/fields), or the recipe's instruction."""
    module = tasks.module(recipe.task)
    trained = teacher.trained_for
    zero_shot = not (trained is not None and trained.kind == info.kind and
                     set(trained.labels) >= set(info.labels) and
                     set(trained.fields) >= set(info.fields))
    example = Example(messages=tuple(messages), answer="")
    built = module.prompt(example, info, zero_shot=zero_shot)
    if recipe.instruction:
        instruction = {"role": "system", "content": recipe.instruction}
        if module.OWN_SYSTEM_TURN:  # the task's system turn gives way to the instruction
            built[0] = instruction
        else:  # the conversation as it is, the instruction before it
            built = [instruction, *built]
    return built


def _valid(task: str, info: TaskInfo, reply) -> tuple[object, str | None]:
    """(the answer as data, None) or (None, why it is not valid)."""
    if reply is None:
        return None, "teacher_failed"
    if reply.truncated:
        return None, "truncated"
    text = reply.text.strip()
    if not text:
        return None, "empty"
    return tasks.module(task).synth_answer(text, info)


def _consensus(answers: list, min_agreement: float) -> tuple[object, float]:
    """The majority answer among valid samples and its share of all samples."""
    keys = [json.dumps(a, sort_keys=True) for a in answers if a is not None]
    if not keys:
        return None, 0.0
    key, count = Counter(keys).most_common(1)[0]
    share = count / len(answers)
    return (json.loads(key) if share >= min_agreement else None), share


def _score(reply) -> int | None:
    match = re.search(r"[1-5]", reply.text) if reply is not None else None
    return int(match.group()) if match else None


class Synth:
    """One generation: the teacher, its cache, the usage and filter counts."""

    def __init__(self, recipe: SynthRecipe, workspace: Path, progress):
        from tuneloop.store import Registry

        self.recipe, self.progress = recipe, progress
        self.registry = Registry.open(workspace)
        self.teacher = make_teacher(recipe.teacher, self.registry)
        self.judge = (make_teacher(recipe.judge.teacher, self.registry)
                      if recipe.judge.enabled and recipe.judge.teacher else self.teacher)
        self.cache = Cache(request_cache_path(workspace))
        self.usage, self.filters = Usage(), Filters()
        self.prompts: dict[str, str] = {}

    def ask(self, asks: list[Ask], what: str, teacher: Teacher | None = None):
        self.progress(f"{what}: {len(asks)} request(s)")
        return ask_all(teacher or self.teacher, asks, self.cache, self.usage)

    def label(self, items: list[tuple[list[dict], dict]], info: TaskInfo) -> list[dict]:
        """Rows for (messages, row) items: labelled / answered, validated, agreed on."""
        c = self.recipe.consistency
        samples = c.samples if tasks.module(self.recipe.task).SYNTH_CONSENSUS else 1
        prompts = [_prompt(self.recipe, info, self.teacher, m) for m, _ in items]
        if prompts:
            self.prompts.setdefault("task", prompts[0][0]["content"] if prompts[0][0]["role"] ==
                                    "system" else "")
        limit = tasks.module(info.kind).synth_max_tokens(self.recipe.teacher.max_tokens, info)
        asks = [Ask.of(p, max_tokens=limit, temperature=c.temperature if samples > 1 else 0.0,
                       sample=s)
                for p in prompts for s in range(samples)]
        replies = self.ask(asks, "answering")
        out = []
        for n, (messages, row) in enumerate(items):
            got = [_valid(self.recipe.task, info, r)
                   for r in replies[n * samples:(n + 1) * samples]]
            text = messages[-1]["content"]
            if samples == 1:
                answer, why = got[0]
                if why:
                    self.filters.drop(why, text, reply=(replies[n].text if replies[n] else ""))
                    continue
            else:
                answer, share = _consensus([a for a, _ in got], c.min_agreement)
                if answer is None:
                    why = "disagreement" if share else got[0][1]  # no valid sample: say why
                    self.filters.drop(why, text, agreement=round(share, 2))
                    continue
            out.append(_row(self.recipe.task, messages, answer, row))
        return self._judged(out)

    def _judged(self, rows: list[dict]) -> list[dict]:
        if not self.recipe.judge.enabled or not rows:
            return rows
        self.prompts["judge"] = JUDGE_SYSTEM
        asks = [Ask.of([{"role": "system", "content": JUDGE_SYSTEM},
                        {"role": "user", "content": f"Request:\n{prompt_text(r)}\n\nAnswer:\n"
                                                    f"{_answer_text(r)}"}], max_tokens=4)
                for r in rows]
        kept = []
        for row, reply in zip(rows, self.ask(asks, "judging", self.judge)):
            score = _score(reply)
            if score is None or score < self.recipe.judge.min_score:
                self.filters.drop("judge_score", prompt_text(row), score=score)
                continue
            kept.append(row)
        return kept

    def preferences(self, items: list[tuple[list[dict], dict]], info: TaskInfo) -> list[dict]:
        temperature = self.recipe.consistency.temperature
        asks = [Ask.of(_prompt(self.recipe, info, self.teacher, m), sample=s,
                       temperature=temperature, max_tokens=self.recipe.teacher.max_tokens)
                for m, _ in items for s in (0, 1)]
        replies = self.ask(asks, "sampling two replies each")
        pairs, pair_asks = [], []
        self.prompts["pair"] = PAIR_SYSTEM
        for n, (messages, _) in enumerate(items):
            a, b = replies[2 * n], replies[2 * n + 1]
            text = messages[-1]["content"]
            if a is None or b is None or not a.text.strip() or not b.text.strip():
                self.filters.drop("teacher_failed", text)
                continue
            if a.text.strip() == b.text.strip():
                self.filters.drop("identical", text)
                continue
            pairs.append((messages, a.text.strip(), b.text.strip()))
            pair_asks.append(Ask.of([{"role": "system", "content": PAIR_SYSTEM},
                                     {"role": "user", "content": f"Request:\n{text}\n\nA:\n"
                                      f"{a.text.strip()}\n\nB:\n{b.text.strip()}"}], max_tokens=2))
        out = []
        for (messages, a, b), verdict in zip(pairs, self.ask(pair_asks, "judging pairs",
                                                              self.judge)):
            choice = (verdict.text.strip()[:1].upper() if verdict else "")
            if choice not in ("A", "B"):
                self.filters.drop("no_verdict", messages[-1]["content"],
                                  reply=verdict.text if verdict else "")
                continue
            chosen, rejected = (a, b) if choice == "A" else (b, a)
            out.append({"prompt": messages, "chosen": chosen, "rejected": rejected})
        return out

    def expand(self, seeds: list[dict], info: TaskInfo) -> list[tuple[list[dict], dict]]:
        """New inputs in the seeds' style, each with the label it was written for (classify)."""
        spec, rng = self.recipe.expand, random.Random(self.recipe.seed)
        self.prompts["expand"] = EXPAND_SYSTEM
        by_label: dict[str | None, list[dict]] = {}
        per_label = tasks.module(info.kind).EXPAND_BY_LABEL
        for row in seeds:
            by_label.setdefault(row.get("label") if per_label else None, []).append(row)
        groups = sorted(by_label, key=str)
        asks, intended = [], []
        for r in range(spec.requests):
            group = groups[r % len(groups)]
            shots = rng.sample(by_label[group], min(spec.shots, len(by_label[group])))
            about = f" Every message has the intent \"{group}\"." if group is not None else ""
            lines = "\n".join(f"- {' '.join(prompt_text(s).split())}" for s in shots)
            asks.append(Ask.of([{"role": "system", "content": EXPAND_SYSTEM},
                                {"role": "user", "content": f"Examples:\n{lines}\n\nWrite "
                                 f"{spec.per_request} new, different ones of the same kind.{about}"}],
                               temperature=spec.temperature, sample=r,
                               max_tokens=self.recipe.teacher.max_tokens))
            intended.append(group)
        index = NearDuplicates(self.recipe.near_threshold)
        digests: dict[bytes, str] = {}  # exact key -> "seed" or "new"
        for i, row in enumerate(seeds):
            key = cleaning.match_key(prompt_text(row))
            digests[exact_digest(key)] = "seed"
            index.add(-1 - i, key)  # seeds have negative ids, new inputs their position
        items = []
        for reply, group in zip(self.ask(asks, "writing new inputs"), intended):
            for text in _lines(reply.text if reply else ""):
                key = cleaning.match_key(text)
                if len(key) < 3:
                    self.filters.drop("too_short", text)
                    continue
                seen = digests.get(exact_digest(key))
                if seen is None:
                    match, _ = index.match(key)
                    seen = None if match is None else "seed" if match < 0 else "new"
                if seen is not None:
                    self.filters.drop("repeats_seed" if seen == "seed" else "duplicate", text)
                    continue
                digests[exact_digest(key)] = "new"
                index.add(len(items), key)
                items.append(([{"role": "user", "content": text}], {"intended": group}))
        self.progress(f"{len(items)} new input(s) written")
        return items

    def overlapping(self, rows: list[dict], files: list[Path], reason: str) -> list[dict]:
        """Rows whose prompt does not (nearly) repeat a row of `files`."""
        if not files:
            return rows
        index = NearDuplicates(self.recipe.near_threshold)
        digests = set()
        for n, path in enumerate(files):
            for _, row, problem in read_rows(path):
                if problem is None and isinstance(row, dict):
                    key = cleaning.match_key(prompt_text(row))
                    digests.add(exact_digest(key))
                    index.add(n, key)
        kept = []
        for row in rows:
            key = cleaning.match_key(prompt_text(row))
            if exact_digest(key) in digests or index.match(key)[0] is not None:
                self.filters.drop(reason, prompt_text(row))
                continue
            kept.append(row)
        return kept


def _lines(text: str) -> list[str]:
    """One example per line; bullets, numbering and wrapping quotes removed."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip().strip('"“”')
        if line:
            out.append(line)
    return out


def _row(task: str, messages: list[dict], answer, source: dict) -> dict:
    return tasks.module(task).synth_row(messages, answer)


def _answer_text(row: dict) -> str:
    if "label" in row:
        return str(row["label"])
    if "fields" in row:
        return json.dumps(row["fields"], ensure_ascii=False)
    return row["messages"][-1]["content"]


def synthesize(recipe: SynthRecipe, workspace: Path | None = None, progress=None):
    """Generate, filter and record: returns the dataset version (tuneloop.data.curate.Version)."""
    from tuneloop.project import workspace as default_workspace

    workspace = workspace or default_workspace()
    progress = progress or (lambda _: None)
    job = Synth(recipe, workspace, progress)
    try:
        seeds = _read(recipe.seeds, recipe.task, labelled=True)
        info = _task_info(recipe, seeds, job.teacher)
        if recipe.mode == "expand":
            items = job.expand(seeds, info)
        else:
            items = [(input_messages(r), r) for r in _read(recipe.inputs, recipe.task, False)]
        offered = len(items)
        if recipe.mode == "preferences":
            rows = job.preferences(items, info)
        else:
            rows = job.label(items, info)
            if recipe.mode == "expand" and tasks.module(recipe.task).EXPAND_BY_LABEL and \
                    recipe.expand.verify:
                rows = _verified(rows, items, job)
        rows = job.overlapping(rows, recipe.dedup_against, "repeats_existing")
        rows = job.overlapping(rows, recipe.check_against, "matches_test_row")
    finally:
        job.cache.close()
    if job.usage.failed and not rows:
        raise TuneloopError(f"every request to the teacher failed ({job.usage.failed}); the "
                            f"first error: {job.usage.errors[0]}")
    synthetic = len(rows)
    if recipe.include_seeds:
        rows = seeds + rows
    lineage = {
        "kind": "synthetic", "mode": recipe.mode, "teacher": job.teacher.describe(),
        "judge": job.judge.describe() if recipe.judge.enabled else None,
        "prompts": job.prompts, "usage": job.usage.to_dict(),
        "offered": offered, "synthetic_rows": synthetic, "seed_rows": len(seeds),
        "dropped": dict(job.filters.counts), "dropped_examples": job.filters.examples,
        "recipe": json.loads(recipe.model_dump_json()),
    }
    prep = PrepareRecipe(name=recipe.name, task=recipe.task, split=recipe.split,
                         anonymize=recipe.anonymize, check_against=recipe.check_against,
                         dedup={"near": {"threshold": recipe.near_threshold}},
                         report=recipe.report)
    version = prepare(rows, prep, workspace=workspace, progress=progress, lineage=lineage)
    if not version.created:  # the same rows again (e.g. all from the cache): say what this did
        version.report = {**version.report, "lineage": lineage}
    return version


def _verified(rows: list[dict], items: list, job: Synth) -> list[dict]:
    """Expanded classification inputs the teacher labelled as the label they were written for."""
    intended = {m[-1]["content"]: src["intended"] for m, src in items}
    kept = []
    for row in rows:
        if row["label"] != intended.get(row["text"]):
            job.filters.drop("label_mismatch", row["text"], intended=intended.get(row["text"]),
                             teacher=row["label"])
            continue
        kept.append(row)
    return kept
