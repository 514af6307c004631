"""A classification head: one weight row per label over the prompt's last hidden state.

A classifier can decide in two ways. It can write its label (the label trie of tasks/labels.py
scores every label as the product of its tokens' probabilities), or, with `head: labels`, a
linear head reads the decoder's final hidden state at the prompt's last token (the assistant
header, where the label's first token would be predicted) and gives one logit per label: one
softmax over the label set, trained with cross-entropy, as PEFT's sequence-classification task
type does. The head lives on the causal LM as `label_head`, so its weight trains, checkpoints
and resumes with the adapter's; the artifact keeps it in `label_head.safetensors` beside the
adapter. A model with a head still writes its label: serving forces the chosen label's tokens
(serve/engine.py), so the reply is the same text behind the same API.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.core.batching import collate
from tuneloop.core.tokenize import IGNORE, Encoded
from tuneloop.models.scoring import attention, autocast, causal_lm

HEAD_FILE = "label_head.safetensors"


class LabelHead(nn.Module):
    """Logits over `labels` from a hidden state. Zero at the start: every label equally likely,
    so the first updates fit the head to the base model's features before the adapter moves
    them (the adapter's B matrices start at zero as well)."""

    def __init__(self, hidden: int, labels: list[str]):
        super().__init__()
        self.labels = list(labels)
        self.weight = nn.Parameter(torch.zeros(len(self.labels), hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight.float())


def attach(model, labels: list[str]) -> LabelHead:
    """A fresh trainable head on `model` (plain or PEFT-wrapped), on the model's device."""
    lm = causal_lm(model)
    hidden = lm.get_output_embeddings().weight.shape[1]
    lm.label_head = LabelHead(hidden, labels).to(lm.get_output_embeddings().weight.device)
    return lm.label_head


def find(model) -> LabelHead | None:
    """The model's head, or None when it writes its labels."""
    head = dict(causal_lm(model).named_children()).get("label_head")
    return head if isinstance(head, LabelHead) else None


def save(head: LabelHead, folder: Path) -> None:
    """Write the head beside the artifact's adapter (or model) files."""
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(folder / HEAD_FILE))


def read(path: Path) -> torch.Tensor:
    """The weight `save` wrote to `path` ([labels, hidden])."""
    from safetensors.torch import load_file

    return load_file(str(path))["weight"]


def load(model, folder: Path, labels: list[str]) -> LabelHead | None:
    """Attach the head saved in `folder`, if the artifact has one."""
    if not (folder / HEAD_FILE).exists():
        return None
    weight = read(folder / HEAD_FILE)
    head = attach(model, labels)
    if weight.shape != head.weight.shape:
        raise ValueError(f"{folder / HEAD_FILE}: {weight.shape[0]} labels x {weight.shape[1]} "
                         f"hidden, but the artifact names {len(labels)} labels and the model's "
                         f"hidden size is {head.weight.shape[1]}")
    with torch.no_grad():
        head.weight.copy_(weight)
    head.requires_grad_(False)
    return head


def encode(prompt: list[int], label: int) -> Encoded:
    """A training item: the prompt's tokens, with the gold label's index where the prompt
    ends (the only position that is not IGNORE), so the loop's batching and counting (one
    target per row) serve the head unchanged."""
    return Encoded(list(prompt), [IGNORE] * (len(prompt) - 1) + [label])


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the head reads of a prompt's final hidden states [rows, tokens, hidden]: the state
    at each row's last real token (padded on either side) -> [rows, hidden]."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _final_states(model, input_ids: torch.Tensor, **masking) -> torch.Tensor:
    """The decoder's final (normed) hidden states [rows, tokens, hidden] (bf16 on a GPU);
    `masking`: an attention mask or a packed batch's position ids."""
    lm = causal_lm(model)
    with autocast(lm):
        return lm.get_decoder()(input_ids=input_ids, **masking, use_cache=False).last_hidden_state


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states, pooled for the head: [rows, hidden]."""
    return pool(_final_states(model, input_ids, attention_mask=attention_mask), attention_mask)


def loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the gold labels under the head, items) for a micro-batch of
    `encode`d items, in padded rows or packed ones (core/batching.pack): each item's gold
    label sits at its prompt's last token, the only position that is not IGNORE."""
    batch = {k: v.to(causal_lm(model).device, non_blocking=True) for k, v in batch.items()}
    hidden = _final_states(model, batch["input_ids"], **attention(batch))
    last = batch["labels"] != IGNORE
    gold = batch["labels"][last]
    return F.cross_entropy(find(model)(hidden[last]), gold, reduction="sum"), int(gold.numel())


@torch.no_grad()
def distribution(model, pad_id: int, prompts: list[list[int]], batch_size: int = 16,
                 on_batch=None) -> torch.Tensor:
    """P(label | prompt) under the head for every prompt (rows) and label (columns)."""
    head = find(model)
    out = torch.zeros(len(prompts), len(head.labels), dtype=torch.float64)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([Encoded(prompts[i], prompts[i]) for i in idx], pad_id)
        hidden = last_hidden(model, batch["input_ids"].to(model.device),
                             batch["attention_mask"].to(model.device))
        out[idx] = torch.softmax(head(hidden).double(), -1).cpu()
        if on_batch:
            on_batch(len(idx))
    return out
