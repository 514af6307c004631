"""Finding personal data: patterns, the name model and the possessive rule, resolved into one
list of findings per text (the package's docstring tells the layers apart)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tuneloop.data.pii_model import NER_TYPES, NameModel, ensure_ner_model
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
