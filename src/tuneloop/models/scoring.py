"""What a model says of a batch's answers: their logits, loss and log-probabilities, computed
only where they are taken (training, evaluation and preference scoring share them).

The output projection of a 49k-token vocabulary is a fifth of a small model's compute and
most of its activation memory; prompt tokens carry no loss, so their logits are never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneloop.data.tokenize import IGNORE


def causal_lm(model):
    """The underlying *ForCausalLM of a plain or PEFT-wrapped model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attention(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What tells the model which tokens see which: a packed batch's position ids (and no
    mask: transformers then keeps attention inside each example, data/batching.pack), else the
    padding mask."""
    if "position_ids" in batch:
        return {"position_ids": batch["position_ids"]}
    return {"attention_mask": batch["attention_mask"]}


def answer_logits(model, batch: dict[str, torch.Tensor], decoder=None):
    """(logits at answer positions, their target ids, mask of those positions [rows, len-1]).
    `decoder` runs the model's body instead of its own (a compiled one: train/sft.py)."""
    lm = causal_lm(model)
    batch = {k: v.to(lm.device, non_blocking=True) for k, v in batch.items()}
    # On a GPU the matmuls run in bf16 (float32 master weights stay float32: full fine-tuning).
    gpu = lm.device.type == "cuda"
    with torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16, enabled=gpu):
        body = lm.get_decoder() if decoder is None else decoder
        hidden = body(input_ids=batch["input_ids"], **attention(batch),
                      use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return logits.float(), targets[keep], keep


def completion_loss(model, batch: dict[str, torch.Tensor], decoder=None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over answer tokens, number of those tokens) for one batch."""
    logits, targets, _ = answer_logits(model, batch, decoder)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's answer log-probability: the sum over its answer tokens (DPO)."""
    logits, targets, keep = answer_logits(model, batch)
    token = -F.cross_entropy(logits, targets, reduction="none")
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
