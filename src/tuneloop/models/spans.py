"""A span head: extraction by tagging the input's tokens instead of writing JSON.

With `head: spans` (task extract), a linear head reads the decoder's final hidden state at
every token of the user's text and gives one logit per BIO tag of the task's fields (`O`,
`B-field`, `I-field`), trained with the adapter by cross-entropy at every token, as an
encoder's token-classification head is. Decoding is Viterbi over the allowed transitions (an
`I-` tag only continues its own field), so the tag sequence is valid by construction, and each
value is the text under its span, copied out of the input: a value is never invented. The
reply is the task's one answer shape (tasks/extract.py): every field, `null` where the text
holds none, a list where a field holds several.

A decoder's token sees only what precedes it, and a tag needs the words after it too
("Paris" in "Paris Hilton" is a person). The head's pass therefore reads the text in one of
three ways (`context`, chosen on the validation split: bench/span_context.py, docs/evaluation.md):

    echo           the text read twice, the second copy tagged: its tokens have seen the
                   whole text once (Springer et al. 2024, echo embeddings); twice the
                   tokens, the default: on WNUT 2017's validation split, one epoch each,
                   field F1 0.564 against 0.490 (bidirectional), 0.483 (encoder) and
                   0.534 (causal)
    bidirectional  the causal mask lifted in the head's pass: every token sees the whole
                   text (Li et al. 2023, LS-unLLaMA; BehnamGhader et al. 2024, LLM2Vec)
    encoder        as the model reads, then one bidirectional transformer layer of the
                   head's own over the final states (the "second bidirectional layer")
    causal         as the model reads, left to right (the pitfall, kept for comparison)

The head lives on the causal LM as `span_head`, so its weights train, checkpoint and resume
with the adapter's; the artifact keeps them in `span_head.safetensors`, whose metadata names
the fields and the context, so a server needs nothing else to answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.core.batching import collate
from tuneloop.core.tokenize import IGNORE, Encoded
from tuneloop.models.scoring import autocast, causal_lm

SPAN_FILE = "span_head.safetensors"
CONTEXTS = ("echo", "bidirectional", "encoder", "causal")  # the default first (bench/span_context.py)
NEG = -1e9  # a disallowed transition's score (finite: a row of them still has a maximum)


def tag_names(fields) -> list[str]:
    """`O`, then `B-` and `I-` of each field, in the task's order."""
    return ["O"] + [f"{p}-{f}" for f in fields for p in ("B", "I")]


class SpanHead(nn.Module):
    """Logits over the fields' BIO tags from each token's hidden state. Zero at the start:
    every tag equally likely, so the first updates fit the head to the base model's features
    before the adapter moves them."""

    def __init__(self, hidden: int, fields, context: str = CONTEXTS[0], written=(),
                 written_tokens: int = 0):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"span context {context!r}: expected one of {', '.join(CONTEXTS)}")
        self.fields, self.context = list(fields), context
        # the task's other fields, which the model writes as JSON beside the spans (a hybrid
        # extractor: tasks/extract.decide), and the new tokens their answer may take
        self.written, self.written_tokens = list(written), written_tokens
        self.tags = tag_names(self.fields)
        self.weight = nn.Parameter(torch.zeros(len(self.tags), hidden))
        self.bias = nn.Parameter(torch.zeros(len(self.tags)))
        if context == "encoder":  # pre-norm, so at the start it adds to the states it reads
            self.encoder = nn.TransformerEncoderLayer(
                hidden, _heads(hidden), dim_feedforward=2 * hidden, dropout=0.0,
                batch_first=True, norm_first=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight.float(), self.bias.float())

    def mix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The states the tags are read from: the encoder context's bidirectional layer over
        the real tokens of each row (in float32), else the decoder's states as they are."""
        if self.context != "encoder":
            return hidden
        return self.encoder(hidden.float(), src_key_padding_mask=~attention_mask.bool())


def _heads(hidden: int) -> int:
    """The encoder layer's attention heads: head width 64 where the hidden size allows."""
    return next(h for h in (hidden // 64, 8, 4, 2, 1) if h and hidden % h == 0)


def attach(model, fields, context: str = CONTEXTS[0], written=(), written_tokens: int = 0
           ) -> SpanHead:
    """A fresh trainable head on `model` (plain or PEFT-wrapped), on the model's device."""
    lm = causal_lm(model)
    embeddings = lm.get_output_embeddings().weight
    lm.span_head = SpanHead(embeddings.shape[1], fields, context, written,
                            written_tokens).to(embeddings.device)
    return lm.span_head


def find(model) -> SpanHead | None:
    """The model's span head, or None when it writes its answer."""
    head = dict(causal_lm(model).named_children()).get("span_head")
    return head if isinstance(head, SpanHead) else None


def save(head: SpanHead, folder: Path) -> None:
    """Write the head beside the artifact's adapter (or model) files; its metadata names the
    fields and the context its pass reads the text in."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
              str(folder / SPAN_FILE),
              metadata={"fields": json.dumps(head.fields), "context": head.context,
                        "written": json.dumps(head.written),
                        "written_tokens": str(head.written_tokens)})


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the head's settings: fields, context, written, written_tokens) that `save`
    wrote to `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {"fields": json.loads(meta.get("fields", "[]")),
                     "context": meta.get("context", CONTEXTS[0]),
                     "written": json.loads(meta.get("written", "[]")),
                     "written_tokens": int(meta.get("written_tokens", "0"))}


def load(model, folder: Path) -> SpanHead | None:
    """Attach the head saved in `folder`, if the artifact has one (frozen)."""
    if not (folder / SPAN_FILE).exists():
        return None
    tensors, settings = read(folder / SPAN_FILE)
    fields = settings["fields"]
    head = attach(model, **settings)
    if tensors["weight"].shape != head.weight.shape:
        raise ValueError(f"{folder / SPAN_FILE}: {tensors['weight'].shape[0]} tags x "
                         f"{tensors['weight'].shape[1]} hidden, but its {len(fields)} fields "
                         f"need {len(head.tags)} tags and the model's hidden size is "
                         f"{head.weight.shape[1]}")
    head.load_state_dict({k: v.to(head.weight.device) for k, v in tensors.items()})
    head.requires_grad_(False)
    head.eval()
    return head


# Text, tokens and tags.

def tokens(tokenizer, text: str, max_length: int | None = None) -> tuple[list[int], list]:
    """(token ids, (start, end) character offsets) of the text alone, no special tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None:
        ids, offsets = ids[:max_length], offsets[:max_length]
    return ids, offsets


def value_strings(value) -> list[str]:
    """A field's values as strings (a list's items, a number as written), none for null."""
    items = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def locate(text: str, fields: dict, names) -> tuple[list[tuple[int, int, str]], int, int]:
    """(character spans (start, end, field) of each value found in the text, values found,
    values in all): each value where it first occurs at or after the field's previous value
    and over no span already taken (a list's values are in text order). A value is looked
    for as written (case aside), then with spacing and punctuation aside, as the metric
    compares values (tasks/extract.normalize): an address annotated on one line, commas
    between its parts, is still the span of its receipt's lines."""
    taken: list[tuple[int, int, str]] = []
    found = total = 0
    for name in names:
        at = 0
        for value in value_strings((fields or {}).get(name)):
            total += 1
            for pattern in _patterns(value):
                hit = _free(pattern, text, at, taken)
                if hit:
                    taken.append((*hit, name))
                    found, at = found + 1, hit[1]
                    break
    return sorted(taken), found, total


def _patterns(value: str) -> list[re.Pattern]:
    """How `locate` looks for a value, strictest first: as written, then its words with any
    run of spacing or punctuation between them."""
    words = re.findall(r"[^\W_]+", value)
    return [re.compile(re.escape(value), re.IGNORECASE)] + (
        [re.compile(r"[\W_]+".join(map(re.escape, words)), re.IGNORECASE)] if words else [])


def _free(pattern: re.Pattern, text: str, at: int, taken) -> tuple[int, int] | None:
    """The first match at or after `at` over no taken span (each start tried in turn)."""
    while (m := pattern.search(text, at)) is not None:
        if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
            return m.span()
        at = m.start() + 1
    return None


def token_tags(offsets, spans, names) -> list[int]:
    """Each token's BIO tag index for the character spans: `B-` on the first token that
    overlaps a span's text, `I-` on the rest it overlaps, `O` elsewhere."""
    index = {t: i for i, t in enumerate(tag_names(names))}
    tags, prev = [], None
    for start, end in offsets:
        hit = next((s for s in spans if start < s[1] and end > s[0]), None)
        if hit is None:
            tags.append(index["O"])
        else:
            tags.append(index[("I-" if hit is prev else "B-") + hit[2]])
        prev = hit
    return tags


def layout(ids: list[int], context: str) -> tuple[list[int], int]:
    """(the pass's input ids, where the tagged copy of the text starts in it)."""
    return (ids + ids, len(ids)) if context == "echo" else (list(ids), 0)


def encode(tokenizer, text: str, fields: dict, names, context: str,
           max_length: int | None = None) -> Encoded:
    """A training item: the text's tokens (twice for echo), with each tagged token's BIO tag
    index as its label and IGNORE elsewhere."""
    cap = max_length // 2 if max_length and context == "echo" else max_length
    ids, offsets = tokens(tokenizer, text, cap)
    spans, _, _ = locate(text, fields, names)
    inputs, first = layout(ids, context)
    return Encoded(inputs, [IGNORE] * first + token_tags(offsets, spans, names))


def _mask(attention_mask: torch.Tensor, context: str) -> torch.Tensor | None:
    """The pass's 4-D mask for a bidirectional read of right- or left-padded rows: every real
    token sees every real token (a padding position itself, so no row is empty); None: the
    model's own causal mask."""
    if context != "bidirectional":
        return None
    real = attention_mask.bool()
    see = real[:, None, None, :].expand(-1, 1, real.shape[1], -1).clone()
    see |= torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    return see


def _states(model, batch: dict, head: SpanHead) -> torch.Tensor:
    """The hidden states [rows, tokens, hidden] the head reads its tags from."""
    lm = causal_lm(model)
    mask = batch["attention_mask"]
    four_d = _mask(mask, head.context)
    if four_d is not None and lm.config._attn_implementation != "sdpa":  # eager: additive
        four_d = torch.zeros(four_d.shape, device=mask.device).masked_fill(
            ~four_d, torch.finfo(torch.float32).min)
    with autocast(lm):
        hidden = lm.get_decoder()(input_ids=batch["input_ids"],
                                  attention_mask=mask if four_d is None else four_d,
                                  use_cache=False).last_hidden_state
    return head.mix(hidden, mask)


def loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the gold tags, tagged tokens) for a padded micro-batch of
    `encode`d items."""
    head = find(model)
    batch = {k: v.to(causal_lm(model).device, non_blocking=True) for k, v in batch.items()}
    hidden = _states(model, batch, head)
    tagged = batch["labels"] != IGNORE
    gold = batch["labels"][tagged]
    return F.cross_entropy(head(hidden[tagged]), gold, reduction="sum"), int(gold.numel())


def allowed(names) -> torch.Tensor:
    """[from, to] transitions a tag sequence may make: `I-f` only after `B-f` or `I-f`."""
    tags = tag_names(names)
    ok = torch.ones(len(tags), len(tags), dtype=torch.bool)
    for j, tag in enumerate(tags):
        if tag.startswith("I-"):
            ok[:, j] = False
            ok[tags.index("B-" + tag[2:]), j] = ok[j, j] = True
    return ok


def viterbi(logprobs: torch.Tensor, ok: torch.Tensor) -> list[int]:
    """The most probable tag sequence [tokens] under per-token log-probabilities [tokens,
    tags] that makes only allowed transitions (and starts on no `I-` tag)."""
    trans = torch.where(ok, 0.0, NEG).to(logprobs.dtype)
    start = torch.where(ok.all(0), 0.0, NEG).to(logprobs.dtype)  # (an I- tag is never first)
    score, back = logprobs[0] + start, []
    for t in range(1, logprobs.shape[0]):
        total = score[:, None] + trans  # [from, to]
        best, arg = total.max(0)
        back.append(arg)
        score = best + logprobs[t]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def sample(logprobs: torch.Tensor, ok: torch.Tensor, temperature: float, generator=None
           ) -> list[int]:
    """A tag sequence drawn left to right from each token's softmax at `temperature`, each
    draw among the tags the previous one allows (so it is valid as Viterbi's is)."""
    path: list[int] = []
    for t in range(logprobs.shape[0]):
        can = ok.all(0) if not path else ok[path[-1]]
        weights = torch.softmax(torch.where(can, logprobs[t] / temperature, NEG), -1)
        path.append(int(torch.multinomial(weights, 1, generator=generator)))
    return path


def spans_of(path: list[int], names) -> list[tuple[int, int, str]]:
    """(first token, last token + 1, field) of each span in a valid tag sequence."""
    tags = tag_names(names)
    out, open_ = [], None
    for t, k in enumerate(path + [0]):
        tag = tags[k]
        if open_ is not None and not tag.startswith("I-"):
            out.append((open_[0], t, open_[1]))
            open_ = None
        if tag.startswith("B-"):
            open_ = (t, tag[2:])
    return out


def _number(text: str):
    """A number field's value from its span ("RM 12,50" -> 12.5), else None."""
    digits = re.sub(r"[^\d.\-]", "", text.replace(",", "."))
    try:
        return float(digits)
    except ValueError:
        return None


def answer(text: str, offsets, path: list[int], probs: torch.Tensor, field_info: dict,
           names) -> tuple[dict, dict]:
    """(the answer in the task's shape, each value's confidence) from a decoded tag path.

    A value is the text from its first token's first character to its last token's last,
    its spacing collapsed (a span over a receipt's lines reads as one line). Its confidence is the product of its tokens' tag probabilities. A list
    field (or one of no single type) holds every span, a string or number field its most
    confident one; a field with no span is null."""
    found: dict[str, list[tuple[str, float]]] = {n: [] for n in names}
    for first, last, name in spans_of(path, names):
        value = " ".join(text[offsets[first][0]:offsets[last - 1][1]].split())
        if value:
            p = float(torch.prod(probs[torch.arange(first, last), torch.tensor(path[first:last])]))
            found[name].append((value, p))
    out, confidence = {}, {}
    for name in names:
        kind = (field_info.get(name) or {}).get("type", "any")
        got = found[name]
        if not got:
            out[name] = None
        elif kind == "list" or (kind == "any" and len(got) > 1):
            out[name], confidence[name] = [v for v, _ in got], [p for _, p in got]
        else:
            value, p = max(got, key=lambda vp: vp[1])
            out[name] = _number(value) if kind == "number" else value
            confidence[name] = p
    return out, confidence


@torch.no_grad()
def extract(model, tokenizer, texts: list[str], field_info: dict, max_length: int | None = None,
            batch_size: int = 16, on_batch=None, temperature: float = 0.0,
            generator=None) -> list[tuple[dict, dict, float]]:
    """Each text's (answer, each value's confidence, the whole tag path's probability: that
    the row is tagged exactly right) under the model's span head, in the texts' order: the
    most probable valid tag path (Viterbi) at temperature 0, else one drawn (`sample`)."""
    head = find(model)
    names, ok = head.fields, allowed(head.fields)
    device = causal_lm(model).device
    tokenized = [tokens(tokenizer, t, max_length) for t in texts]
    out: list = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(tokenized[i][0]))
    for at in range(0, len(order), batch_size):
        idx = order[at:at + batch_size]
        items = [Encoded(*[layout(tokenized[i][0], head.context)[0]] * 2) for i in idx]
        batch = {k: v.to(device) for k, v in collate(items, tokenizer.pad_token_id).items()}
        logits = head(_states(model, batch, head)).float().cpu()
        for row, i in enumerate(idx):
            ids, offsets = tokenized[i]
            first = layout(ids, head.context)[1]
            if not ids:
                out[i] = ({n: None for n in names}, {}, 1.0)
                continue
            probs = torch.softmax(logits[row, first:first + len(ids)], -1)
            logprobs = torch.log(probs.clamp_min(1e-30))
            path = (viterbi(logprobs, ok) if temperature <= 0
                    else sample(logprobs, ok, temperature, generator))
            whole = float(torch.prod(probs[torch.arange(len(path)), torch.tensor(path)]))
            out[i] = (*answer(texts[i], offsets, path, probs, field_info, names), whole)
        if on_batch:
            on_batch(len(idx))
    return out


def text_of(messages: list[dict]) -> str:
    """What a span head reads of a conversation: its last user turn's text."""
    return next((str(m.get("content") or "") for m in reversed(messages)
                 if m.get("role") == "user"), "")
