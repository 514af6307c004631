"""Replacing personal data consistently within a row: placeholders, fakes or reversible
placeholders (Presidio's anonymizer), names found once replaced wherever they recur."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import replace
from functools import lru_cache
from typing import Iterable

from tuneloop.data.pii.detect import MODES, Detector, Finding
from tuneloop.data.rows import get_path, set_path, text_paths
from tuneloop.errors import TuneloopError


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
