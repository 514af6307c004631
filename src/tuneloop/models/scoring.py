"""What a model says of a batch's answers: their logits, loss and log-probabilities, computed
only where they are taken (training, evaluation and preference scoring share them).

The output projection of a 49k-token vocabulary is a fifth of a small model's compute and
most of its activation memory; prompt tokens carry no loss, so their logits are never formed.
Answer tokens' logits are formed a chunk of rows at a time (LOGIT_CHUNK): a long answer's
8,192 tokens at a 128k vocabulary would otherwise hold 4 GB of float32 logits, and as much
again for their gradient. Where the head does not train (LoRA, QLoRA, DPO), the hidden
states' gradient is formed chunk by chunk in the forward pass; where it does (full
fine-tuning) and for other functions of the logits (distillation), each chunk is formed again
in the backward pass (activation checkpointing). Either way no chunk's logits are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuneloop.core.tokenize import IGNORE

# Full-vocabulary logits held at once, in elements (128 MB in float32): 256 rows at a 128k
# vocabulary, 682 at SmolLM2's 49k. A classification answer of a few tokens is one chunk.
LOGIT_CHUNK = 2**25


def causal_lm(model):
    """The underlying *ForCausalLM of a plain or PEFT-wrapped model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attention(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What tells the model which tokens see which: a packed batch's position ids (and no
    mask: transformers then keeps attention inside each example, core/batching.pack), else the
    padding mask."""
    if "position_ids" in batch:
        return {"position_ids": batch["position_ids"]}
    return {"attention_mask": batch["attention_mask"]}


def autocast(lm):
    """The context a model's passes run in: on a GPU the matmuls run in bf16 (float32 master
    weights stay float32: full fine-tuning); on a CPU, as the weights are."""
    gpu = lm.device.type == "cuda"
    return torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16, enabled=gpu)


def answer_hidden(model, batch: dict[str, torch.Tensor], decoder=None):
    """(final hidden states at the positions that predict answer tokens [n, hidden], their
    target ids [n], mask of those positions [rows, len-1]). `decoder` runs the model's body
    instead of its own (a compiled one: train/sft.py)."""
    lm = causal_lm(model)
    batch = {k: v.to(lm.device, non_blocking=True) for k, v in batch.items()}
    with autocast(lm):
        body = lm.get_decoder() if decoder is None else decoder
        hidden = body(input_ids=batch["input_ids"], **attention(batch),
                      use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep], keep


def _chunk_rows(head) -> float:
    """Answer rows a chunk holds. (ZeRO-3 gathers a module's weights at each call, a
    collective every rank must join as often: ranks with more answer rows would call the head
    more often and wait forever; there every row is one chunk.)"""
    if hasattr(head.weight, "ds_id"):
        return math.inf
    return max(1, LOGIT_CHUNK // head.weight.shape[0])


def over_rows(model, fn: Callable, hidden: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """fn(float32 logits [k, vocab], *rows' chunk) -> a value per row, over every answer row,
    LOGIT_CHUNK elements of logits at a time; with gradients, each chunk's logits are formed
    again in the backward pass instead of kept."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()

    def chunk(h, *rest):
        with autocast(lm):
            logits = head(h)
        return fn(logits.float(), *rest)

    size = _chunk_rows(head)
    if hidden.shape[0] <= size:
        return chunk(hidden, *rows)
    tracked = torch.is_grad_enabled() and (hidden.requires_grad
                                           or any(p.requires_grad for p in head.parameters()))
    out = []
    for start in range(0, hidden.shape[0], size):
        part = [x[start:start + size] for x in (hidden, *rows)]
        out.append(checkpoint(chunk, *part, use_reentrant=False) if tracked else chunk(*part))
    return torch.cat(out)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy at each answer row through an output head that does not train, a chunk
    of rows at a time, with the hidden states' gradient formed in the forward pass (as
    Liger-Kernel's fused linear cross-entropy does): no chunk's logits are kept, and none is
    formed twice. The gradient of row i's loss is (softmax_i - onehot_i) @ W whatever the
    loss's weight, which the backward pass applies: a sum (SFT) or a per-row weight (DPO)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, size):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # (float32 until the backward pass weighs it: the weights are often tiny, 1 / tokens)
        grad = (torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
                if ctx.needs_input_grad[0] else None)
        ctx.dtype = hidden.dtype
        for start in range(0, hidden.shape[0], size):
            rows = slice(start, start + size)
            t = targets[rows]
            logits = F.linear(hidden[rows], weight, bias).float()
            total = logits.logsumexp(-1)
            losses[rows] = total - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                logits.sub_(total[:, None]).exp_()  # the softmax, in place
                logits[torch.arange(len(t), device=t.device), t] -= 1
                grad[rows] = logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, weights):
        (grad,) = ctx.saved_tensors
        return (grad * weights[:, None].float()).to(ctx.dtype), None, None, None, None


def _token_loss(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def token_losses(model, batch: dict[str, torch.Tensor], decoder=None):
    """(cross-entropy at each answer token [n], their target ids, mask [rows, len-1])."""
    hidden, targets, keep = answer_hidden(model, batch, decoder)
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    size = _chunk_rows(head)
    # A plain head (not adapted, not quantized) that does not train: LoRA, QLoRA, DPO.
    if (type(head) is torch.nn.Linear and size < math.inf
            and not any(p.requires_grad for p in head.parameters())):
        with autocast(lm):
            losses = _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, size)
        return losses, targets, keep
    return over_rows(model, _token_loss, hidden, targets), targets, keep


def completion_loss(model, batch: dict[str, torch.Tensor], decoder=None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over answer tokens, number of those tokens) for one batch."""
    losses, targets, _ = token_losses(model, batch, decoder)
    return losses.sum(), int(targets.numel())


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's answer log-probability: the sum over its answer tokens (DPO)."""
    losses, _, keep = token_losses(model, batch)
    token = -losses
    if "sequence" in batch:  # packed: the item each target token belongs to
        sequence = batch["sequence"]
        rows, n = sequence[:, 1:].to(keep.device)[keep], int(sequence.max()) + 1
    else:
        rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
        n = keep.shape[0]
    return torch.zeros(n, device=token.device).index_add(0, rows, token)


@torch.no_grad()
def mean_loss(model, batches, loss=completion_loss) -> float:
    """Token-weighted mean completion loss over batches (validation, perplexity); `loss`
    computes it (a sharded model's gathers its weights)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        summed, n = loss(model, batch)
        total += float(summed)
        count += n
    model.train(was_training)
    return total / count if count else float("nan")


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from [n, 2] (chosen, rejected) log-probabilities."""
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return -F.logsigmoid(beta * margin)
