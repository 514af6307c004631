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


def answer_logits(model, batch: dict[str, torch.Tensor]):
    """(logits at answer positions, their target ids, mask of those positions [rows, len-1])."""
    lm = causal_lm(model)
    batch = {k: v.to(lm.device, non_blocking=True) for k, v in batch.items()}
    # On a GPU the matmuls run in bf16 (float32 master weights stay float32: full fine-tuning).
    gpu = lm.device.type == "cuda"
    with torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16, enabled=gpu):
        hidden = lm.get_decoder()(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return logits.float(), targets[keep], keep


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over answer tokens, number of those tokens) for one batch."""
    logits, targets, _ = answer_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's answer log-probability: the sum over its answer tokens (DPO)."""
    logits, targets, keep = answer_logits(model, batch)
    token = -F.cross_entropy(logits, targets, reduction="none")
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], device=token.device).index_add(0, rows, token)


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
