"""Choosing each next token of a served reply: a grammar's mask (xgrammar), then greedy or
temperature + nucleus sampling with the request's own generator."""

from __future__ import annotations

import torch


class GrammarMatcher:
    """An xgrammar matcher with LabelMatcher's interface: the reply must match `grammar`."""

    confidence = None  # a grammar's reply has no label probability

    def __init__(self, grammar, vocab: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)  # refilled every step

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.bitmask)
        logits = logits.unsqueeze(0).clone()
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits[0]

    def accept(self, token: int, logits: torch.Tensor) -> None:
        self.matcher.accept_token(token)

    def done(self) -> bool:
        return self.matcher.is_terminated()


def sample(logits: torch.Tensor, row) -> int:
    """One token for an engine row (its matcher, its request's sampling settings, its
    generator): grammar mask, then greedy (temperature 0) or temperature + nucleus sampling."""
    unmasked = logits
    if row.matcher is not None:  # (its masks live on the CPU)
        unmasked = logits.cpu()
        logits = row.matcher.constrain(unmasked)
    s = row.request.sampling
    if s.temperature <= 0:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits.cpu() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > s.top_p  # always keeps the top one
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=row.generator))
    if row.matcher is not None:
        row.matcher.accept(token, unmasked)
    return token
