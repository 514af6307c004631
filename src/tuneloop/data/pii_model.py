"""The spaCy name recognizers behind pii.py's model layer: trained here, once, and cached.

No hub is reachable at run time and spaCy's own pipelines are not on PyPI, so tuneloop trains
these models itself on the MIT-licensed Presidio synthetic PII sentences and CC-BY banking77
messages without personal data shipped in `resources/`, each sentence also with its names
swapped for others (`swap_entities`). Two models, trained side by side (about four minutes on
two cores), cached by the hash of their data, settings and this file:
- `cased` reads text as written (a third of its rows also in lower case);
- `uncased` reads it lower-cased, so it cannot lean on capitals. Chat messages are often
  written without them ("follow up with benjamin a seiler"), where the cased model misses
  names it would find capitalized; pii.py adds what the uncased model finds that the cased
  one did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

CASES = ("cased", "uncased")

RESOURCES = Path(__file__).parent / "resources"
NER_TRAIN = RESOURCES / "pii_ner_train.jsonl"
NER_NEGATIVES = RESOURCES / "pii_ner_negatives.jsonl"
NER_EPOCHS = 12
LOWERCASE_EVERY = 3  # one row in three is also trained in lower case
# Each shipped sentence is also trained with its names, companies, places and street addresses
# swapped for others (Faker, in the locales of the data's addresses, or another sentence's), so
# the model learns the contexts and shapes of names rather than the few hundred it was shown.
SWAP_COPIES = 2
SWAP_LOCALES = ("en_US", "en_GB", "de_DE", "nl_NL", "da_DK", "it_IT", "fr_FR", "es_ES", "sv_SE",
                "fi_FI", "pt_BR")
SWAPPABLE = ("PERSON", "ORGANIZATION", "GPE", "STREET_ADDRESS")
# Training labels of the shipped data → the types tuneloop reports. Street addresses, zip codes
# and places are one LOCATION: for anonymization what matters is that they go, not which they were.
# The model learns the structured types too, from their context ("card number ..."): a card
# number that fails the Luhn check is still somebody's card number in a support ticket.
NER_LABELS = {"PERSON": "PERSON", "ORGANIZATION": "ORGANIZATION", "GPE": "LOCATION",
              "STREET_ADDRESS": "LOCATION", "ZIP_CODE": "LOCATION", "DATE_TIME": "DATE_TIME",
              "AGE": "AGE", "NRP": "NRP", "EMAIL_ADDRESS": "EMAIL_ADDRESS",
              "PHONE_NUMBER": "PHONE_NUMBER", "CREDIT_CARD": "CREDIT_CARD",
              "IBAN_CODE": "IBAN_CODE", "IP_ADDRESS": "IP_ADDRESS", "DOMAIN_NAME": "URL",
              "US_SSN": "US_SSN"}
NER_TYPES = sorted(set(NER_LABELS.values()))

def ner_model_path(epochs: int = NER_EPOCHS, case: str = "cased") -> Path:
    """Where the recognizer trained from the shipped data with these settings lives. The key
    holds this file too: a change to how rows are made never reuses an older model."""
    digest = hashlib.sha256(NER_TRAIN.read_bytes() + NER_NEGATIVES.read_bytes() +
                            Path(__file__).read_bytes() +
                            json.dumps([NER_LABELS, epochs, LOWERCASE_EVERY, SWAP_COPIES, SWAP_LOCALES,
                                       SWAPPABLE, BRAND_TAILS, case]).encode())
    from tuneloop.models import cache_root

    return cache_root() / f"pii-ner-{case}-{digest.hexdigest()[:12]}"


def lower_keep(text: str) -> str:
    """`text` in lower case, character for character ("İ" lower-cases to two characters and is
    left as it is), so spans found in the lowered text are spans of the original."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def train_ner(out: Path, rows: Iterable[dict] | None = None, epochs: int = NER_EPOCHS,
              on_epoch: Callable[[int, int, float], None] | None = None, seed: int = 0) -> Path:
    """Train a spaCy NER pipeline on rows {"text", "entities": [[start, end, label], ...]}.

    Written to a temporary folder and renamed, so a half-trained model is never loaded.
    """
    import spacy
    from spacy.training import Example
    from spacy.util import filter_spans, fix_random_seed, minibatch

    fix_random_seed(seed)
    if rows is None:
        rows = training_rows()
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ner")
    examples = []
    for row in rows:
        doc = nlp.make_doc(row["text"])
        spans = []
        for start, end, label in row["entities"]:
            label = NER_LABELS.get(label, label if label in NER_TYPES else None)
            if label and (span := doc.char_span(start, end, label=label, alignment_mode="expand")):
                spans.append(span)
        ents = [(s.start_char, s.end_char, s.label_) for s in filter_spans(spans)]
        examples.append(Example.from_dict(doc, {"entities": ents}))
    for label in NER_TYPES:
        ner.add_label(label)
    optimizer = nlp.initialize(lambda: examples)
    rng = random.Random(seed)
    for epoch in range(epochs):
        rng.shuffle(examples)
        losses: dict[str, float] = {}
        for batch in minibatch(examples, size=16):
            nlp.update(batch, drop=0.2, sgd=optimizer, losses=losses)
        if on_epoch:
            on_epoch(epoch + 1, epochs, losses.get("ner", 0.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    nlp.to_disk(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: its model is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def training_rows(swap_copies: int = SWAP_COPIES, seed: int = 0, case: str = "cased",
                  shipped: list[dict] | None = None) -> list[dict]:
    """The shipped sentences with their entities (or `shipped`, a part of them held out
    elsewhere), the negatives and copies with the entities swapped; for the cased model also
    lower-cased copies of every third, for the uncased one all of them lower-cased."""
    if shipped is None:
        shipped = [json.loads(line) for line in NER_TRAIN.open(encoding="utf-8")]
    negatives = [json.loads(line) for line in NER_NEGATIVES.open(encoding="utf-8")]
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for row in shipped:
        for start, end, label in row["entities"]:
            pools.setdefault(label, []).append(row["text"][start:end])
    fakers = _swap_fakers(seed)
    swapped = [swap_entities(row, rng, pools, fakers) for _ in range(swap_copies)
               for row in shipped if row["entities"]]
    rows = shipped + negatives + swapped
    lowered = rows if case == "uncased" else rows[::LOWERCASE_EVERY]
    lowered = [{"text": lower_keep(r["text"]), "entities": r["entities"]} for r in lowered]
    return lowered if case == "uncased" else rows + lowered


def _swap_fakers(seed: int) -> list:
    from faker import Faker

    fakers = []
    for locale in SWAP_LOCALES:
        fake = Faker(locale)
        fake.seed_instance(seed)
        fakers.append(fake)
    return fakers


def _stand_in(label: str, original: str, rng: random.Random, pools: dict[str, list[str]],
              fakers: list) -> str:
    """Another value of the same kind and about the same shape as `original`."""
    fake = rng.choice(fakers)
    if label == "ORGANIZATION" and original.isupper() and len(original) <= 5:  # an acronym
        return "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVW") for _ in range(rng.randint(2, 5)))
    if rng.random() < 0.3 and pools.get(label):
        value = rng.choice(pools[label])
    elif label == "PERSON":
        words = len(original.split())
        value = (rng.choice([fake.first_name, fake.last_name])() if words == 1 else
                 f"{fake.first_name()} {fake.last_name()}" if words == 2 else fake.name())
    elif label == "ORGANIZATION":
        # Faker's companies all carry a legal form or surnames ("Schmidt GmbH", "Smith LLC");
        # half are brand-like names instead ("Voluptas", "Ametlabs Research"), as startups are.
        value = fake.company() if rng.random() < 0.5 else _brand(rng, fake)
    elif label == "GPE":
        value = rng.choice([fake.city, fake.city, fake.country])()
    elif original.strip().isdigit():  # the zip-code piece of an address
        value = fake.postcode()
    else:
        value = fake.street_address()
    value = " ".join(value.split())
    return value.lower() if original.islower() else value.upper() if original.isupper() else value


BRAND_TAILS = ("", "", "", " Inc", " LLC", " Ltd", " Corp", " Co", " GmbH", " AG", " Group",
               " Labs", " Systems", " Research", " Corporation", " Technologies", " Insurance",
               " Traffic", " Media", " Bank")


def _brand(rng: random.Random, fake) -> str:
    first = fake.word().capitalize()
    name = first if rng.random() < 0.5 else first + fake.word().lower()[:rng.randint(2, 5)]
    return name + rng.choice(BRAND_TAILS)


def swap_entities(row: dict, rng: random.Random, pools: dict[str, list[str]], fakers: list) -> dict:
    """`row` with each entity of a SWAPPABLE kind replaced by a stand-in; the spans follow."""
    text, pieces, entities, at, length = row["text"], [], [], 0, 0
    for start, end, label in sorted(row["entities"]):
        if start < at:  # overlaps the previous entity: leave it out
            continue
        value = (_stand_in(label, text[start:end], rng, pools, fakers) if label in SWAPPABLE
                 else text[start:end])
        pieces += [text[at:start], value]
        length += start - at
        entities.append([length, length + len(value), label])
        length += len(value)
        at = end
    pieces.append(text[at:])
    return {"text": "".join(pieces), "entities": entities}


def _missing() -> list[str]:
    """The cases whose recognizer this machine has not trained yet."""
    return [case for case in CASES if not (ner_model_path(case=case) / "meta.json").is_file()]


def ner_model_ready() -> bool:
    """Whether this machine has the recognizers already (else the next use trains them)."""
    return not _missing()


def _train_case(case: str) -> Path:
    return train_ner(ner_model_path(case=case), training_rows(case=case))


def ensure_ner_models(on_epoch: Callable[[int, int, float], None] | None = None
                      ) -> dict[str, Path]:
    """The cached recognizers by case, trained now where this machine has none yet: the
    uncased one in a second process while this one trains the cased one (spaCy trains on one
    core); `on_epoch` hears the cased one."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    paths = {case: ner_model_path(case=case) for case in CASES}
    missing = _missing()
    if not missing:
        return paths
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        others = [pool.submit(_train_case, case) for case in missing if case != "cased"]
        if "cased" in missing:
            train_ner(paths["cased"], training_rows(case="cased"), on_epoch=on_epoch)
        for future in others:
            future.result()
    return paths
