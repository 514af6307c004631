"""What the training loop (train/sft.py) minimizes, and over what: an `Objective` turns
examples into training items, items into micro-batches, and a micro-batch into a summed step
loss with what it is averaged over. Supervised fine-tuning's (answer tokens, or a classifier's
label set) and the label head's are here; DPO's `Preference` is in train/dpo.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import math

import torch

from tuneloop import tasks
from tuneloop.core.batching import collate, pack, padded_batches, update_batches
from tuneloop.core.tokenize import IGNORE, Encoded, encode, prompt_ids
from tuneloop.models import head as label_head
from tuneloop.models import spans
from tuneloop.models.scoring import completion_loss
from tuneloop.tasks.info import answer_room
from tuneloop.train.plan import default_epochs, default_loss, resolve_head


def schedule(lengths: list[int], epochs: float, batch_size: int, batch_tokens: int, seed: int,
             parts: int = 1, packed: bool = False) -> list[list[list[int]]]:
    """Every optimizer update of the run as its micro-batches, epoch after epoch (a fractional
    last epoch is cut short). The updates do not depend on `batch_tokens` or `packed`
    (core.batching); their micro-batches do."""
    updates: list[list[list[int]]] = []
    for epoch in range(math.ceil(epochs)):
        epoch_updates = update_batches(lengths, batch_size, batch_tokens, seed + epoch, parts,
                                       packed=packed)
        share = min(1.0, epochs - epoch)
        updates += epoch_updates[: max(1, round(share * len(epoch_updates)))]
    return updates


class Objective:
    """What the loop minimizes, and over what: how examples become training items, how items
    make a micro-batch, the step loss and what it is averaged over. The loop (`run_sft`) owns
    everything else once: plan, batches, accumulation, schedule, resume, checkpoints, early
    stopping, several processes, stats and curves. This one is supervised fine-tuning: the
    loss on answer tokens (or, `loss: labels`, a classifier's over its label set), averaged
    over the step's answer tokens; train/dpo.py's `Preference` is the other."""

    name = "sft"
    meta: dict = {}  # more of the artifact's tuneloop.json

    def __init__(self, loss: Callable | None = None):
        self.loss = loss or completion_loss
        self.can_pack = loss is None  # the label-set loss reads each row as one example

    can_pack = True  # whether its step loss reads packed rows (core.batching.pack)
    row_tokens: int | None = None  # set by run_sft when packed; None: padded rows

    def encode(self, tokenizer, module, info, examples) -> list:
        return [encode(tokenizer, module.prompt(e, info), module.target(e, info)) for e in examples]

    rows = 1  # sequences per item in a micro-batch (DPO: a chosen and a rejected reply)

    def size(self, item) -> int:
        """The item's longest sequence (held to the recipe's max_length); in a micro-batch it
        takes `rows` x that many padded tokens."""
        return len(item)

    def collate(self, items: list, pad: int) -> dict:
        return pack(items, pad, self.row_tokens) if self.row_tokens else collate(items, pad)

    def schedule(self, lengths: list[int], epochs: float, batch_size: int, batch_tokens: int,
                 seed: int, parts: int = 1, packed: bool = False) -> list:
        """The run's optimizer updates, each as its micro-batches (indices into the items): the
        loop runs as many updates as this holds, and plans its learning-rate schedule, its
        validations and checkpoints in them. Default: length-grouped epochs (`schedule`)."""
        return schedule(lengths, epochs, batch_size, batch_tokens, seed, parts, packed=packed)

    def step_batches(self, model, update: list, items: list, pad: int) -> list[dict]:
        """One update's micro-batches, asked at its step with the model as it is then: an
        on-policy objective may generate them here; supervised ones collate their items."""
        return [self.collate([items[i] for i in b], pad) for b in update]

    def count(self, batch: dict) -> int:
        """What the step's summed loss is divided by: its answer tokens."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def epochs(self, n_items: int) -> float:
        return default_epochs(n_items)

    def attach(self, model) -> None:
        """Add what the objective trains beside the method's weights (a label head), to the
        model as prepared; again when a sharded run rebuilds it whole."""

    def begin(self, model, train: list, validation: list, batch_tokens: int, pad: int) -> None:
        """Before the first step (and again on resume), with the model as training starts."""

    def validation_loss(self, model) -> Callable:
        """The loss validation reports (the answer tokens' cross-entropy for SFT, comparable
        across runs whatever the step loss is)."""
        return completion_loss

    def batches(self, items: list, pad: int, batch_tokens: int) -> list[dict]:
        """Validation's micro-batches."""
        return padded_batches(items, pad, batch_tokens)

    def save(self, model, folder: Path) -> None:
        """Write what the objective adds to the artifact, beside the method's files."""

    def task_metric(self, tokenizer, splits) -> tuple[str, Callable] | None:
        """(name, model -> the validation split's task metric) where the objective has one
        cheap enough to score at every validation (the best weights are then kept by it);
        None: the loop's own choice (a label set's accuracy, else the loss)."""
        return None


class LabelHead(Objective):
    """`head: labels`: a classifier decides with a head over the prompt's last hidden state
    (models/head.py), trained with the adapter by cross-entropy over the label set. An item
    is the prompt alone: the label is never written, so a step costs the prompt's tokens only.
    Packed rows serve it as padded ones: the head reads each item's last prompt token."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.loss = label_head.loss
        self.meta = {"head": "labels"}

    def encode(self, tokenizer, module, info, examples) -> list:
        return [label_head.encode(prompt_ids(tokenizer, module.prompt(e, info)),
                                  self.labels.index(module.target(e)))
                for e in examples if module.target(e) in self.labels]

    def attach(self, model) -> None:
        label_head.attach(model, self.labels)

    def validation_loss(self, model) -> Callable:
        return label_head.loss

    def save(self, model, folder: Path) -> None:
        label_head.save(label_head.find(model), folder)


class Tagged(Encoded):
    """A span head's training item: a text's tokens and each tagged token's tag."""


class SpanHead(Objective):
    """`head: spans`: an extractor tags the input's tokens with its fields' BIO tags through a
    head over their hidden states (models/spans.py), trained with the adapter by cross-entropy
    at every token of the text. An item is the text alone (twice for the echo context): no
    answer is written, so a step costs the text's tokens only. Rows are padded (the
    bidirectional pass masks by rows); its validation metric is the field F1 of the spans.

    A hybrid extractor (`written`: the fields whose values are mostly not in their text, a
    date rewritten, a total computed) also learns to write those fields' JSON: each example
    then adds a written item (the prompt naming only them, the answer holding only them), its
    micro-batches kept apart from the tagged ones, and the step's loss is the sum of both over
    all their counted tokens (tags and answer tokens)."""

    can_pack = False

    def __init__(self, fields, context: str, written=()):
        self.fields, self.context, self.written = list(fields), context, list(written)
        self.written_tokens = 0
        self.meta = {"head": "spans", "span_context": context,
                     **({"written_fields": self.written} if self.written else {})}

    @staticmethod
    def loss(model, batch: dict):
        if "tagged" in batch:
            return spans.loss(model, {k: v for k, v in batch.items() if k != "tagged"})
        return completion_loss(model, batch)

    def encode(self, tokenizer, module, info, examples) -> list:
        items = [spans.encode(tokenizer, spans.text_of(module.prompt(e, info)), e.fields,
                              self.fields, self.context) for e in examples]
        items = [Tagged(x.input_ids, x.labels) for x in items if len(x)]  # (none: no tokens)
        if self.written:
            part = module.subset(info, self.written)
            answers = [module.target(e, part) for e in examples]
            self.written_tokens = max(self.written_tokens, answer_room(tokenizer, answers))
            items += [encode(tokenizer, module.prompt(e, part), a)
                      for e, a in zip(examples, answers)]
        return items

    def step_batches(self, model, update: list, items: list, pad: int) -> list[dict]:
        return [batch for b in update
                for batch in self._apart([items[i] for i in b], lambda xs: [collate(xs, pad)])]

    def batches(self, items: list, pad: int, batch_tokens: int) -> list[dict]:
        return self._apart(items, lambda xs: padded_batches(xs, pad, batch_tokens))

    @staticmethod
    def _apart(items: list, batch) -> list[dict]:
        """`batch` (items -> micro-batches) of the tagged items, marked, then of the written
        ones: each kind collated apart."""
        tagged = [x for x in items if isinstance(x, Tagged)]
        written = [x for x in items if not isinstance(x, Tagged)]
        return ([{**b, "tagged": torch.ones(1)} for b in batch(tagged)] if tagged else []) + (
            batch(written) if written else [])

    def count(self, batch: dict) -> int:
        if "tagged" in batch:
            return int((batch["labels"] != IGNORE).sum())  # every tagged token (none shifted)
        return super().count(batch)

    def attach(self, model) -> None:
        spans.attach(model, self.fields, self.context, self.written, self.written_tokens)

    def validation_loss(self, model) -> Callable:
        return self.loss

    def save(self, model, folder: Path) -> None:
        spans.save(spans.find(model), folder)

    def task_metric(self, tokenizer, splits) -> tuple[str, Callable]:
        """Field F1 on the validation split, decoded as at test (tasks/extract.decide)."""
        module, info = tasks.module(splits.info.kind), splits.info
        prompts = [module.prompt(e, info) for e in splits.validation]
        golds = [module.gold(e, info) for e in splits.validation]

        def field_f1(model) -> float:
            model.eval()
            outputs = module.decide(model, tokenizer, None, info, messages=prompts)[0]
            model.train()
            parsed = [module.parse(o, info) for o in outputs]
            return module.metrics([p for p, _ in parsed], golds, [v for _, v in parsed])[
                "field_f1"]

        return "field_f1", field_f1


def objective_for(recipe, tokenizer, info) -> Objective:
    """Supervised fine-tuning's objective for the recipe: answer tokens, a classifier's label
    set (`loss: labels`), its head (`head: labels`) or an extractor's (`head: spans`)."""
    head = resolve_head(recipe, info)
    if head == "labels":
        return LabelHead(list(info.labels))
    if head == "spans":
        found = tasks.module(info.kind).spanned(info)
        if not found:
            from tuneloop.errors import TuneloopError

            shares = ", ".join(f"{n} {(info.field_info.get(n) or {}).get('in_text', 0):.0%}"
                               for n in info.fields)
            raise TuneloopError(f"head: spans: no field's training values are mostly spans of "
                                f"their text (found in it: {shares}; a span head needs 90%); "
                                "leave out head, and the model writes its answer")
        return SpanHead(found, recipe.span_context or spans.CONTEXTS[0],
                        [f for f in info.fields if f not in found])
    if (recipe.loss or default_loss(recipe.task, recipe.method)) == "labels":
        from tuneloop.tasks.labels import LabelTrie, label_loss

        return Objective(label_loss(LabelTrie(tokenizer, info.labels)))
    return Objective()
