"""Personal data: find it with Presidio's analyzer, replace it with Presidio's anonymizer.

Two layers and a rule feed one list of candidates:
- patterns with checksums (Presidio's recognizers): e-mail, phone (libphonenumber), credit card
  (Luhn), IBAN (mod 97), IP, URL, US SSN, UK NINO, and numeric dates (11/22/2000, 2000-11-22);
- a token-classification model for people, organizations, places and addresses, dates, ages and
  nationality/religious/political groups (and structured values by their context), which
  tuneloop fine-tunes once from the MiniLM encoder it ships and caches (pii_model.py);
and below both, a rule for a capitalized name before a possessive 's (`possessors`).
Where they overlap, the validated pattern wins, then the model.

Replacements are consistent within an example: the same person is `<PERSON_1>` in the prompt,
the reply and the extracted fields. `fake` mode puts realistic stand-ins (Faker, seeded by the
original so reruns agree) instead; `reversible` mode keeps the placeholder → original map,
encrypted (Fernet) with a key that stays in the workspace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tuneloop.data.pii_model import NER_TYPES, NameModel, ensure_ner_model
from tuneloop.data.rows import get_path, set_path, text_paths
from tuneloop.errors import TuneloopError

PATTERN_TYPES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL",
                 "US_SSN", "UK_NINO", "DATE_TIME"]
ENTITY_TYPES = sorted(set(NER_TYPES) | set(PATTERN_TYPES))
MODES = ("placeholder", "fake", "reversible")
SCORE_THRESHOLD = 0.4
MODEL = "tuneloop-ner"  # recognizer name of the model's findings
POSSESSOR = "tuneloop-possessor"  # and of names found by their possessive 's
POSSESSOR_SCORE = 0.5

for name in ("presidio-analyzer", "presidio-anonymizer"):
    logging.getLogger(name).setLevel(logging.ERROR)  # it warns per text about unused languages


@dataclass(frozen=True)
class Finding:
    """One piece of personal data in a text: its type and character span (end exclusive)."""

    type: str
    start: int
    end: int
    text: str
    score: float


def _analyzer():
    """Presidio's analyzer with the pattern recognizers (it tokenizes with a blank spaCy
    pipeline, for the context words some patterns look at)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, DateRecognizer,
                                                          EmailRecognizer,
                                                          IbanRecognizer, IpRecognizer,
                                                          PhoneRecognizer, UkNinoRecognizer,
                                                          UrlRecognizer, UsSsnRecognizer)

    class Engine(SpacyNlpEngine):
        """Presidio's spaCy engine over a pipeline already in memory (it would download one)."""

        def __init__(self, nlp):
            super().__init__(ner_model_configuration=NerModelConfiguration(
                model_to_presidio_entity_mapping={}, low_score_entity_names=[],
                labels_to_ignore=[]))
            self.nlp = {"en": nlp}

        def load(self) -> None:
            pass

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (EmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(),
                       IbanRecognizer(), IpRecognizer(), UrlRecognizer(), UsSsnRecognizer(),
                       UkNinoRecognizer(), DateRecognizer()):
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(registry=registry, nlp_engine=Engine(spacy.blank("en")),
                          supported_languages=["en"])


class Detector:
    """Finds personal data of the chosen types; `ner=False` keeps only the pattern layer.

    `model` names a trained recognizer's folder instead of the cached one."""

    def __init__(self, entities: Iterable[str] | None = None, ner: bool = True,
                 score_threshold: float = SCORE_THRESHOLD, model: Path | None = None):
        self.entities = list(entities) if entities else list(ENTITY_TYPES)
        unknown = sorted(set(self.entities) - set(ENTITY_TYPES))
        if unknown:
            raise TuneloopError(f"unknown personal-data type(s) {unknown}; known: "
                                f"{', '.join(ENTITY_TYPES)}")
        self.ner = ner and bool(set(self.entities) & set(NER_TYPES))
        self.threshold = score_threshold
        self.patterns = [e for e in self.entities if e in PATTERN_TYPES]
        self.engine = _analyzer()
        self.model = NameModel(model or ensure_ner_model()) if self.ner else None

    def find(self, text: str) -> list[Finding]:
        return self.find_many([text])[0]

    def find_many(self, texts: list[str], batch_size: int = 64) -> list[list[Finding]]:
        """Findings per text, overlaps resolved (patterns first, then longer spans, then
        higher scores)."""
        from presidio_analyzer import RecognizerResult

        guesses = self.model.find(texts) if self.model else [[] for _ in texts]
        results = []
        nlp = self.engine.nlp_engine
        for (text, artifacts), spans in zip(nlp.process_batch(texts, "en", batch_size=batch_size),
                                            guesses):
            found = self.engine.analyze(text, "en", entities=self.patterns, nlp_artifacts=artifacts,
                                        score_threshold=self.threshold) if self.patterns else []
            spans = [span for span in spans if span[3] >= self.threshold]
            rule = (possessors(text, spans)  # names: not with --no-ner
                    if self.model and POSSESSOR_SCORE >= self.threshold else [])
            found += [RecognizerResult(kind, start, end, score,
                                       recognition_metadata={"recognizer_name": name})
                      for start, end, kind, score, name in
                      [(*span, MODEL) for span in spans] + rule if kind in self.entities]
            results.append(_resolve(text, found))
        return results


# A capitalized name right before a possessive 's is somebody's or some company's name, even
# when its words are ordinary ones the model reads as words ("and Public Storage's Anna Berg").
# In Presidio's training sentences every such name but a contraction ("What's") and one job
# title is a person or a company; WNUT 2017 adds places ("America's").
POSSESSIVE = re.compile(r"(?<![\w'’&-])([\w&-]+)['’]s\b")
WORD_BEFORE = re.compile(r"([\w&-]+\.?)[ \t]+$")
SPACE = re.compile(r"\s*")
TITLES = {"Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "St."}  # a period that ends no sentence
NOT_POSSESSORS = set("""It What That There Here He She Who Where How When Why Let This Today
    Tomorrow Yesterday Tonight Everyone Everybody Someone Somebody Anyone Anybody Nobody One
    Other Another Each Year Mother Father Valentine Women Men Children Monday Tuesday Wednesday
    Thursday Friday Saturday Sunday January February March April May June July August
    September October November December""".split())


def possessors(text: str, spans: list[tuple[int, int, str, float]]
               ) -> list[tuple[int, int, str, float, str]]:
    """Names found by their possessive 's (the model's `spans` win where they overlap): a
    company when a person follows ("Acme Foods's Anna Berg"), else a person. A name is the
    capitalized words, initials and titles before the 's ("Dr. John F. Kennedy's"); a
    sentence's first word is capitalized for the sentence and is left out, as are the words in
    NOT_POSSESSORS ("It's", "Monday's")."""
    found = []
    for m in POSSESSIVE.finditer(text):
        words = [(m.start(1), m.end(1), m.group(1))]
        while _in_name(words[0][2]) and (before := WORD_BEFORE.search(
                text, max(0, words[0][0] - 64), words[0][0])):
            words.insert(0, (before.start(1), before.end(1), before.group(1)))
        if not _in_name(words[0][2]):
            words = words[1:]
        opening = text[max(0, words[0][0] - 64):words[0][0]].rstrip(" \t") if words else ""
        if not opening or opening[-1] in "!?:\n\"“" or (
                opening[-1] == "." and not opening.endswith(tuple(TITLES))
                and not re.search(r"(?:^|\s)[A-Z]\.$", opening)):
            words = words[1:]
        while words and words[0][2] in NOT_POSSESSORS:
            words = words[1:]
        if not words or words[-1][2] in NOT_POSSESSORS:
            continue
        after = SPACE.match(text, m.end()).end()
        person_next = any(a == after and kind == "PERSON" for a, _, kind, _ in spans)
        found.append((words[0][0], words[-1][1], "ORGANIZATION" if person_next else "PERSON",
                      POSSESSOR_SCORE, POSSESSOR))
    return found


def _capitalized(word: str) -> bool:
    """"Anna", "Ástríður", "McDonald": not "ATM", "iPhone" or "anna"."""
    return word[:1].isupper() and word[1:2].islower()


def _in_name(word: str) -> bool:
    """A capitalized word, an initial ("F.") or a title ("Dr."); not "Paris." ending a
    sentence."""
    if word.endswith("."):
        return word in TITLES or (len(word) == 2 and word[0].isupper())
    return _capitalized(word)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


# What a structured value must at least look like before the model's guess of it is believed
# (the model, trained on context, would otherwise call an emoji after "email:" an address).
SHAPES = {
    "EMAIL_ADDRESS": lambda t: "@" in t and "." in t,
    "PHONE_NUMBER": lambda t: _digits(t) >= 6,
    "CREDIT_CARD": lambda t: _digits(t) >= 12,
    "IBAN_CODE": lambda t: _digits(t) >= 8 and any(c.isalpha() for c in t[:2]),
    "IP_ADDRESS": lambda t: _digits(t) >= 2 and ("." in t or ":" in t),
    "URL": lambda t: "." in t and " " not in t,
    "US_SSN": lambda t: _digits(t) >= 7,
}


HOUSE_NUMBER = re.compile(r"[ \t]*\d{1,5}[A-Za-z]?[ \t]+")


def _has_word(text: str) -> bool:
    """A name, place or date has a letter or digit in it (an emoji alone is nobody's name)."""
    return any(c.isalnum() for c in text)


def _from_model(result) -> bool:
    return (result.recognition_metadata or {}).get("recognizer_name") in (MODEL, POSSESSOR)


def _rank(result) -> int:
    """Validated patterns first, then the model, then names found by their possessive 's."""
    name = (result.recognition_metadata or {}).get("recognizer_name")
    return {MODEL: 1, POSSESSOR: 2}.get(name, 0)


def _resolve(text: str, found) -> list[Finding]:
    """Non-overlapping findings: pattern matches (validated formats) before the model's guesses,
    then longer spans, then higher scores."""
    chosen: list[Finding] = []
    for r in sorted(found, key=lambda r: (_rank(r), -(r.end - r.start), -r.score, r.start)):
        start, end = r.start, r.end
        if _from_model(r) and r.entity_type in SHAPES:
            # The tokenizer splits "60-56-85-91" at hyphens: a structured value runs to spaces.
            while start > 0 and not text[start - 1].isspace():
                start -= 1
            while end < len(text) and not text[end].isspace():
                end += 1
        while end > start and text[end - 1] in " \n\t.,;:":  # trailing punctuation is not the name
            end -= 1
        while start < end and text[start] in " \n\t.,;:":  # nor leading
            start += 1
        if _from_model(r) and r.entity_type == "LOCATION":
            # A house number written before the street on its line belongs to the address
            # ("974 Via Roma 131"); the model tends to tag only the street.
            line = text.rfind("\n", 0, start) + 1
            if HOUSE_NUMBER.fullmatch(text, line, start):
                start = line + len(text[line:start]) - len(text[line:start].lstrip())
        if end <= start or any(start < c.end and c.start < end for c in chosen):
            continue
        if _from_model(r) and not SHAPES.get(r.entity_type, _has_word)(text[start:end]):
            continue
        chosen.append(Finding(r.entity_type, start, end, text[start:end], round(r.score, 3)))
    return sorted(chosen, key=lambda f: f.start)


class Replacer:
    """Replacements for one example: the same original gets the same stand-in everywhere."""

    def __init__(self, mode: str = "placeholder"):
        if mode not in MODES:
            raise TuneloopError(f"anonymize mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.seen: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, original: str) -> str:
        key = (kind, " ".join(original.casefold().split()))
        if key not in self.seen:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.seen[key] = (_fake(kind, original) if self.mode == "fake"
                              else f"<{kind}_{self.counts[kind]}>")
        return self.seen[key]

    def mapping(self) -> dict[str, str]:
        """Stand-in → original (the first spelling seen), for reversible mode."""
        return {v: k[1] for k, v in self.seen.items()}


@lru_cache(maxsize=1)
def _faker():
    from faker import Faker

    return Faker("en_US")


FAKES = {"PERSON": "name", "ORGANIZATION": "company", "LOCATION": "city", "DATE_TIME": "date",
         "EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone_number", "IP_ADDRESS": "ipv4",
         "CREDIT_CARD": "credit_card_number", "IBAN_CODE": "iban", "URL": "url", "US_SSN": "ssn",
         "AGE": "pyint", "NRP": "language_name", "UK_NINO": "ssn"}


def _fake(kind: str, original: str) -> str:
    fake = _faker()
    fake.seed_instance(int.from_bytes(hashlib.sha256(f"{kind}:{original}".encode()).digest()[:8]))
    value = getattr(fake, FAKES.get(kind, "word"))()
    return str(value if kind != "AGE" else fake.pyint(18, 90))


def anonymize_text(text: str, findings: list[Finding], replace: Replacer) -> str:
    """The text with each finding replaced (Presidio's anonymizer, one custom operator per type)."""
    if not findings:
        return text
    from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

    for f in sorted(findings, key=lambda f: f.start):
        replace(f.type, f.text)  # number in reading order (the anonymizer works back to front)
    results = [RecognizerResult(f.type, f.start, f.end, f.score) for f in findings]
    operators = {f.type: OperatorConfig("custom", {"lambda": (lambda s, t=f.type: replace(t, s))})
                 for f in findings}
    return _anonymizer().anonymize(text, results, operators).text


@lru_cache(maxsize=1)
def _anonymizer():
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


def propagate(texts: list[str], hits: list[list[Finding]]) -> list[list[Finding]]:
    """Every other mention, in any of one row's texts, of a string found once in it: the model
    may tag "Anna Meyer" in the greeting and miss her in the signature."""
    votes: dict[str, Counter] = {}
    first: dict[str, Finding] = {}
    for found in hits:
        for f in found:
            if len(f.text) >= 3:
                votes.setdefault(f.text.casefold(), Counter())[f.type] += 1
                first.setdefault(f.text.casefold(), f)
    # One string, one type within a row: the type it was found as most often, the first on a
    # tie ("Maria Gonzalez" a person in the greeting, an organization after "account for").
    known = {k: replace(first[k], type=v.most_common(1)[0][0]) for k, v in votes.items()}
    if not known:
        return hits
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(k) for k in
                         sorted(known, key=len, reverse=True)) + r")(?!\w)", re.IGNORECASE)
    out = []
    for text, found in zip(texts, hits):
        found = list(found)
        for m in pattern.finditer(text):
            overlapping = [f for f in found if m.start() < f.end and f.start < m.end()]
            # A known mention replaces shorter guesses it overlaps ("Maria" as an organization
            # where "Maria Gonzalez" is a person elsewhere in the row); longer ones stand.
            if all(f.end - f.start <= m.end() - m.start() for f in overlapping):
                first = known[m.group().casefold()]
                found = [f for f in found if f not in overlapping]
                found.append(Finding(first.type, m.start(), m.end(), m.group(), first.score))
        out.append(sorted(found, key=lambda f: f.start))
    return out


def anonymize_rows(rows: list[dict], detector: Detector, mode: str = "placeholder",
                   fields: Iterable[str] | None = None
                   ) -> tuple[list[dict], list[list[Finding]], list[dict[str, str]]]:
    """Anonymize a batch of rows in place of copies: (new rows, findings per row, maps per row).

    Strings that equal a replaced original exactly (an extracted field holding the customer's
    name) are replaced too, so fields stay consistent with the anonymized text.
    """
    out_rows, all_findings, maps = [], [], []
    per_row = [text_paths(r, fields) for r in rows]
    texts = [get_path(r, p) for r, paths in zip(rows, per_row) for p in paths]
    found = iter(detector.find_many(texts))
    for row, paths in zip(rows, per_row):
        new = json.loads(json.dumps(row))
        replace = Replacer(mode)
        findings: list[Finding] = []
        texts = [get_path(row, p) for p in paths]
        for path, hits in zip(paths, propagate(texts, [next(found) for _ in paths])):
            findings.extend(hits)
            set_path(new, path, anonymize_text(get_path(row, path), hits, replace))
        if replace.seen:
            by_original = {k[1]: v for k, v in replace.seen.items()}
            for path in text_paths(new, fields):
                value = get_path(new, path)
                key = " ".join(value.casefold().split())
                if key in by_original:
                    set_path(new, path, by_original[key])
        out_rows.append(new)
        all_findings.append(findings)
        maps.append(replace.mapping() if mode == "reversible" else {})
    return out_rows, all_findings, maps


def key_path(workspace: Path) -> Path:
    return workspace / "keys" / "pii.key"


def _fernet(workspace: Path, create: bool):
    from cryptography.fernet import Fernet

    path = key_path(workspace)
    if not path.is_file():
        if not create:
            raise TuneloopError(f"{path}: no key; reversible maps can only be opened in the "
                                "workspace that wrote them")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return Fernet(path.read_bytes())


def write_map(path: Path, maps: dict[int, dict[str, str]], workspace: Path) -> None:
    """Encrypt {row number: {stand-in: original}} to `path` (temp file + rename)."""
    token = _fernet(workspace, create=True).encrypt(json.dumps(maps, ensure_ascii=False).encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(token)
    os.replace(tmp, path)


def read_map(path: Path, workspace: Path) -> dict[int, dict[str, str]]:
    from cryptography.fernet import InvalidToken

    try:
        raw = _fernet(workspace, create=False).decrypt(Path(path).read_bytes())
    except InvalidToken:
        raise TuneloopError(f"{path}: not readable with this workspace's key "
                            f"({key_path(workspace)})") from None
    return {int(k): v for k, v in json.loads(raw).items()}


def restore(value, mapping: dict[str, str]):
    """Put the originals back into a value (string, list or dict) anonymized in reversible mode."""
    if isinstance(value, str):
        for stand_in in sorted(mapping, key=len, reverse=True):
            value = value.replace(stand_in, mapping[stand_in])
        return value
    if isinstance(value, list):
        return [restore(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: restore(v, mapping) for k, v in value.items()}
    return value


def _file_rows(path: Path, fields: Iterable[str] | None):
    """Readable rows of a data file in batches of 256; an unreadable row stops with its line."""
    from tuneloop.data.ingest import read_rows

    batch: list[tuple[int, dict]] = []
    for line, row, problem in read_rows(path):
        if problem is not None:
            raise TuneloopError(f"{path} line {problem.line}: {problem.code}: {problem.message}; "
                                "nothing was written")
        if not isinstance(row, dict):
            raise TuneloopError(f"{path} line {line}: a row must be a JSON object; nothing was "
                                "written")
        batch.append((line, row))
        if len(batch) == 256:
            yield batch
            batch = []
    if batch:
        yield batch


def scan_file(path: str | Path, detector: Detector, fields: Iterable[str] | None = None) -> dict:
    """Personal data in a file, reported without changing it: counts by type and each finding's
    line, field path and type (the text itself is not repeated)."""
    path = Path(path)
    by_type: dict[str, int] = {}
    findings, rows, with_pii = [], 0, 0
    for batch in _file_rows(path, fields):
        per_row = [text_paths(r, fields) for _, r in batch]
        found = iter(detector.find_many([get_path(r, p) for (_, r), ps in zip(batch, per_row)
                                         for p in ps]))
        for (line, _), paths in zip(batch, per_row):
            rows += 1
            hit = False
            for p in paths:
                for f in next(found):
                    hit = True
                    by_type[f.type] = by_type.get(f.type, 0) + 1
                    if len(findings) < 1000:
                        findings.append({"line": line, "field": ".".join(map(str, p)),
                                         "type": f.type, "start": f.start, "end": f.end,
                                         "score": f.score})
            with_pii += hit
    return {"path": str(path), "rows": rows, "rows_with_pii": with_pii,
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "findings": findings}


def anonymize_file(src: str | Path, dst: str | Path, detector: Detector, mode: str = "placeholder",
                   fields: Iterable[str] | None = None, workspace: Path | None = None) -> dict:
    """Anonymize every row of a data file into JSONL at `dst` (temp file + rename: a failure
    leaves no output). Reversible mode also writes `dst`.map.enc."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise TuneloopError(f"{dst}: write the anonymized copy to a new file, not over the input")
    if mode == "reversible" and workspace is None:
        raise TuneloopError("reversible mode needs a workspace to keep its key in")
    tmp = dst.with_name(dst.name + ".tmp")
    by_type: dict[str, int] = {}
    maps: dict[int, dict[str, str]] = {}
    rows = with_pii = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for batch in _file_rows(src, fields):
                new, findings, row_maps = anonymize_rows([r for _, r in batch], detector, mode,
                                                         fields)
                for (line, _), row, found, mapping in zip(batch, new, findings, row_maps):
                    rows += 1
                    with_pii += bool(found)
                    for f in found:
                        by_type[f.type] = by_type.get(f.type, 0) + 1
                    if mapping:
                        maps[rows] = mapping
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        if maps:
            write_map(map_path(dst), maps, workspace)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"input": str(src), "output": str(dst), "rows": rows, "rows_with_pii": with_pii,
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])), "mode": mode,
            "map": str(map_path(dst)) if maps else None}


def map_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".map.enc")


def reidentify_file(src: str | Path, dst: str | Path, map_file: str | Path,
                    workspace: Path) -> int:
    """Undo reversible anonymization: row n of `src` gets the originals of map entry n."""
    src, dst = Path(src), Path(dst)
    maps = read_map(Path(map_file), workspace)
    tmp = dst.with_name(dst.name + ".tmp")
    rows = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for batch in _file_rows(src, None):
                for _, row in batch:
                    rows += 1
                    out.write(json.dumps(restore(row, maps.get(rows, {})), ensure_ascii=False)
                              + "\n")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
