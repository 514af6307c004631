"""Decoding held to a label set: a trie over the labels' tokens.

A classifier's reply is one of its labels, exactly as it was trained: the label's own tokens,
then end-of-turn. The trie over those token sequences gives every label a probability, the
product of the model's next-token probabilities renormalized over each node's children, so
the label probabilities sum to one and an answer outside the set cannot be produced.

`label_loss` trains a classifier on that probability. `label_distribution` scores every label for a batch of prompts in two passes per batch: the
prompts (their KV cache is kept), then, on top of it, the trie's nodes on the way to its
branching nodes as one row per prompt with tree attention (`_Tree`). A node with one child
needs no forward pass: its child has probability one. `LabelMatcher` walks the same trie token
by token for the serving engine; its greedy path is the argmax label whenever the mass does
not split below a branch (eval takes the argmax of the whole distribution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneloop.core.batching import collate
from tuneloop.core.tokenize import IGNORE, Encoded
from tuneloop.models.scoring import autocast, causal_lm


class LabelTrie:
    """The labels' token sequences (each ended by `eos`) as a prefix tree. Nodes are numbered
    as they are made, so a node's ancestors all have smaller numbers."""

    def __init__(self, tokenizer, labels: list[str]):
        eos = tokenizer.eos_token_id
        self.labels = list(labels)
        self.children: list[dict[int, int]] = [{}]
        self.parent: list[int] = [-1]
        self.path: list[list[int]] = [[]]
        self.leaf: dict[int, int] = {}  # node reached after a label's end token -> label index
        for index, label in enumerate(self.labels):
            node = 0
            for token in tokenizer(label, add_special_tokens=False)["input_ids"] + [eos]:
                if token not in self.children[node]:
                    self.children.append({})
                    self.parent.append(node)
                    self.path.append(self.path[node] + [token])
                    self.children[node][token] = len(self.children) - 1
                node = self.children[node][token]
            self.leaf[node] = index
        self.branching = [n for n, c in enumerate(self.children) if len(c) > 1]

    def ancestors(self, node: int) -> list[int]:
        """`node` and the nodes above it, the root left out."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parent[node]
        return out


@torch.no_grad()
def label_distribution(model, tokenizer, trie: LabelTrie, prompts: list[list[int]],
                       batch_size: int = 16, on_batch=None,
                       prefix: list[int] | None = None) -> torch.Tensor:
    """P(label | prompt) for every prompt (rows) and label (columns); each row sums to 1.

    With `prefix`, every prompt is `prefix + prompts[i]` and the prefix runs once: its KV cache
    is copied into every batch (many-shot prompts of thousands of tokens). A model with a label
    head (models/head.py) is scored by its head instead.
    """
    import copy

    from transformers import DynamicCache

    from tuneloop.models import head as label_head

    head = label_head.find(model)
    if head is not None:  # `head: labels`: the model decides with its classification head
        if head.labels != trie.labels or prefix:
            raise ValueError("a model with a label head scores its own labels, without a prefix")
        return label_head.distribution(model, tokenizer.pad_token_id, prompts, batch_size,
                                       on_batch)
    device = model.device
    out = torch.zeros(len(prompts), len(trie.labels), dtype=torch.float64)
    tree = _Tree(trie, device)
    head = None
    if prefix:  # (a cache without the model's config keeps every key, sliding layers too)
        head = model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                     past_key_values=DynamicCache()).past_key_values
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([Encoded(prompts[i], prompts[i]) for i in idx], tokenizer.pad_token_id,
                        left_pad=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        cache = DynamicCache()
        if head is not None:
            cache = copy.deepcopy(head)
            cache.batch_repeat_interleave(len(idx))
            mask = torch.cat([mask.new_ones(len(idx), len(prefix)), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - ids.shape[1]:]
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=bool(tree.nodes), logits_to_keep=1)
        # node -> [rows, vocab] logits: renormalized over the node's children only (the softmax
        # over the whole vocabulary would cancel), so the vocabulary is never normalized
        logits = {0: first.logits[:, -1]}
        if tree.nodes:
            logits.update(tree.run(model, first.past_key_values, mask))
        for row, i in enumerate(idx):
            out[i] = _label_probs(trie, {n: x[row] for n, x in logits.items()})
        if on_batch:
            on_batch(len(idx))
    return out


class _Tree:
    """The trie's nodes on the way to its branching nodes below the root, as one row of tokens
    per prompt with tree attention: each token sees its prompt and its own ancestors, at the
    position it would have after the prompt. One pass gives every branching node's next-token
    distribution without a copy of the prompt's KV cache per node (banking77's 77 labels: 17
    branching nodes, 47 distinct tokens on the way to them)."""

    def __init__(self, trie: LabelTrie, device):
        deep = [n for n in trie.branching if n != 0]
        self.nodes = sorted({a for n in deep for a in trie.ancestors(n)})
        at = {n: i for i, n in enumerate(self.nodes)}
        self.branching = {n: at[n] for n in deep}
        self.tokens = torch.tensor([trie.path[n][-1] for n in self.nodes], device=device)
        self.depth = torch.tensor([len(trie.path[n]) for n in self.nodes], device=device)
        sees = torch.zeros(len(self.nodes), len(self.nodes), dtype=torch.bool)
        for n, i in at.items():
            for a in trie.ancestors(n):
                sees[i, at[a]] = True
        self.sees = sees.to(device)

    def run(self, model, cache, mask) -> dict:
        rows, k = mask.shape[0], len(self.nodes)
        allowed = torch.cat([mask.bool()[:, None, :].expand(rows, k, -1),
                             self.sees[None].expand(rows, -1, -1)], dim=2)
        positions = mask.sum(-1, keepdim=True) + self.depth[None] - 1
        bias = self._bias(model, allowed)
        window = getattr(model.config, "sliding_window", None)
        if window and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
            # sliding layers (Gemma 3) see only the last `window` positions
            keys = torch.cat([(mask.cumsum(-1) - 1), positions], dim=1)  # each column's position
            near = positions[:, :, None] - keys[:, None, :] < window
            bias = {"full_attention": bias, "sliding_attention": self._bias(model, allowed & near)}
        keep = torch.tensor(list(self.branching.values()), device=mask.device)
        logits = model(input_ids=self.tokens[None].expand(rows, -1), attention_mask=bias,
                       position_ids=positions, past_key_values=cache, use_cache=False,
                       logits_to_keep=keep).logits
        return {node: logits[:, j] for j, node in enumerate(self.branching)}

    @staticmethod
    def _bias(model, allowed):
        """A 4D additive mask in the model's dtype (0: attend, the dtype's minimum: do not)."""
        dtype = next(model.parameters()).dtype
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _shares(kids: dict[int, int], logits: torch.Tensor) -> list[float]:
    """Each child's log-share of a node's probability: the model's next-token distribution
    renormalized over the children (the tokens that continue some label)."""
    tokens = torch.tensor(list(kids))
    return torch.log_softmax(logits.cpu()[tokens].double(), -1).tolist()


def _label_probs(trie: LabelTrie, logits: dict[int, torch.Tensor]) -> torch.Tensor:
    """Each label's probability: at every branching node on its path, the child's share of
    the children's probability, multiplied along the path (`logits`: node -> next-token)."""
    probs = torch.zeros(len(trie.labels), dtype=torch.float64)
    stack = [(0, 0.0)]
    while stack:
        node, acc = stack.pop()
        if node in trie.leaf:
            probs[trie.leaf[node]] = acc
        kids = trie.children[node]
        if len(kids) == 1:
            stack.append((next(iter(kids.values())), acc))
        elif kids:
            stack.extend((child, acc + s)
                         for child, s in zip(kids.values(), _shares(kids, logits[node])))
    return probs.exp()


class LabelMatcher:
    """The trie walked token by token (the serving engine's constraint for a classifier): only
    the current node's children may come next; the reply ends at a label's end token.
    `confidence` is the chosen label's probability, as `label_distribution` defines it."""

    def __init__(self, trie: LabelTrie):
        self.trie, self.node, self.logp = trie, 0, 0.0

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.tensor(list(self.trie.children[self.node]), device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    def accept(self, token: int, logits: torch.Tensor) -> None:
        kids = self.trie.children[self.node]
        if len(kids) > 1:
            self.logp += _shares(kids, logits)[list(kids).index(token)]
        self.node = kids[token]

    def done(self) -> bool:
        return not self.trie.children[self.node]

    @property
    def confidence(self) -> float:
        return math.exp(self.logp)


def label_loss(trie):
    """A classifier's loss over its label set: -log P(gold label | prompt), the probability
    eval and serving decide with (`tasks.labels`), as cross-entropy over each branching trie
    node's children on the gold label's path. A token the label set leaves no choice over
    carries no loss, and the rest of the vocabulary takes no part: every gradient goes to
    telling the labels apart. Returns `loss(model, batch) -> (summed loss, labels scored)`."""

    def loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        lm = causal_lm(model)
        batch = {k: v.to(lm.device, non_blocking=True) for k, v in batch.items()}
        targets = batch["labels"][:, 1:]
        rows, cols, choices, gold = [], [], [], []
        for row, answer in enumerate(targets.tolist()):
            node = 0
            for col, token in enumerate(answer):
                if token == IGNORE:
                    continue
                kids = trie.children[node]
                if token not in kids:  # past the label's end (or not a label): nothing to learn
                    break
                if len(kids) > 1:
                    rows.append(row), cols.append(col), choices.append(list(kids))
                    gold.append(list(kids).index(token))
                node = kids[token]
        if not rows:
            return lm.get_output_embeddings().weight.sum() * 0.0, 0
        with autocast(lm):
            hidden = lm.get_decoder()(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[rows, cols]).float()
        width = max(len(c) for c in choices)
        index = torch.tensor([c + [c[0]] * (width - len(c)) for c in choices], device=lm.device)
        valid = torch.tensor([[i < len(c) for i in range(width)] for c in choices],
                             device=lm.device)
        picked = logits.gather(1, index).masked_fill(~valid, float("-inf"))
        gold_t = torch.tensor(gold, device=lm.device)
        return F.cross_entropy(picked, gold_t, reduction="sum"), len(targets)

    return loss


class HeadTrie(LabelTrie):
    """A classifier with a label head (models/head.py, `weight`: one row per label): the label
    is chosen once, from the prompt's last hidden state, and the reply is that label's tokens."""

    def __init__(self, tokenizer, labels: list[str], weight: torch.Tensor):
        super().__init__(tokenizer, labels)
        self.weight = weight.float()
        self.end = {index: node for node, index in self.leaf.items()}  # label -> its last node


class HeadMatcher:
    """LabelMatcher's interface for a HeadTrie: `decide` picks the label from the prompt's
    last hidden state (greedy at temperature 0, else sampled from the head's softmax at that
    temperature); the reply is then held to its tokens. `confidence` is the head's probability
    of the label, as eval's."""

    def __init__(self, trie: HeadTrie):
        self.trie, self.path, self.at, self.confidence = trie, [], 0, None

    def decide(self, hidden: torch.Tensor, temperature: float, generator) -> None:
        logits = self.trie.weight @ hidden.float().cpu()
        probs = torch.softmax(logits.double(), -1)
        if temperature <= 0:
            label = int(probs.argmax())
        else:
            label = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1,
                                          generator=generator))
        self.confidence = float(probs[label])
        self.path = self.trie.path[self.trie.end[label]]

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        masked[self.path[self.at]] = 0.0
        return masked

    def accept(self, token: int, logits: torch.Tensor) -> None:
        self.at += 1

    def done(self) -> bool:
        return self.at >= len(self.path)
