"""Answer tokens' full-vocabulary logits are formed a chunk of rows at a time; in training a
frozen head's gradient is formed in the forward pass, and a head that trains has each chunk
formed again in the backward pass. Either way the losses and gradients must be those of the
whole (and of plain autograd), and no tensor of vocabulary width may be kept for the backward
pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.test_packing import examples
from tuneloop.core.batching import collate, pack
from tuneloop.models import scoring
from tuneloop.train.distill import distill_loss


def model_at(tiny_model, seed=0, head_trains=True):
    """The tiny model; with head_trains=False its (tied) embeddings and head are frozen, as
    under LoRA, and its loss takes the fused path (scoring._FrozenHeadCrossEntropy)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    return model


def sequence_sum(model, batch):
    """Rows weighted unequally, as DPO's loss weighs them."""
    logps = scoring.sequence_logps(model, batch)
    return (logps * torch.linspace(-1.0, 2.0, len(logps))).sum(), 0


def teacher_of(tiny_model):
    teacher = model_at(tiny_model, seed=1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher


LOSSES = {
    "completion": lambda tiny: scoring.completion_loss,
    "sequence_logps": lambda tiny: sequence_sum,
    "distillation": lambda tiny: (lambda m, b, t=teacher_of(tiny):
                                  distill_loss(m, b, t, top_k=4, temperature=2.0, weight=0.5)),
}


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss, _ = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def plain_cross_entropy(hidden, weight, bias, targets, size):
    """What the fused loss must equal: plain autograd through full-vocabulary logits."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_losses_and_gradients_equal_the_whole(tiny_model, monkeypatch, name, packed,
                                                      head_trains):
    model = model_at(tiny_model, head_trains=head_trains)
    loss_fn = LOSSES[name](tiny_model)
    items = examples(6, seed=7)
    batch = pack(items, 0, row_tokens=64) if packed else collate(items, 0)
    n_answer = sum(sum(1 for t in x.labels[1:] if t >= 0) for x in items)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 2**62)  # one chunk
    whole = loss_and_grads(model, loss_fn, batch)
    with monkeypatch.context() as m:  # the fused path against plain autograd
        m.setattr(scoring._FrozenHeadCrossEntropy, "apply", plain_cross_entropy)
        reference = loss_and_grads(model, loss_fn, batch)
    for got, expected in zip(whole[1], reference[1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 3 * vocab)  # 3 answer rows a chunk
    assert n_answer > 3 * 4  # several chunks
    chunked = loss_and_grads(model, loss_fn, batch)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(chunked[1], whole[1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # validation: the same value without gradients
        torch.testing.assert_close(loss_fn(model, batch)[0], whole[0], atol=1e-5, rtol=1e-5)


def vocab_wide_bytes_kept(model, batch) -> int:
    """Bytes of tensors of the vocabulary's width that the forward pass keeps for backward."""
    vocab = model.get_output_embeddings().weight.shape[0]
    kept = []

    def pack_hook(t):
        if t.dim() and t.shape[-1] == vocab and t.numel() > vocab:  # (not the head's weight)
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss, _ = scoring.completion_loss(model, batch)
    loss.backward()
    return sum(kept)


def test_a_training_step_keeps_no_full_vocabulary_logits(tiny_model, monkeypatch):
    batch = collate(examples(6, seed=7), 0)
    n_answer = int((batch["labels"][:, 1:] >= 0).sum())
    model = model_at(tiny_model)  # a head that trains (full fine-tuning)
    vocab = model.get_output_embeddings().weight.shape[0]
    # One chunk: the logits (and their log-softmax) are kept, float32, for every answer row.
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 2**62)
    assert vocab_wide_bytes_kept(model, batch) >= n_answer * vocab * 4
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 3 * vocab)
    assert vocab_wide_bytes_kept(model, batch) == 0  # only each chunk's hidden states are
    # A frozen head (LoRA): its gradient is formed in the forward pass, in one chunk or many.
    frozen = model_at(tiny_model, head_trains=False)
    for chunk in (2**62, 3 * vocab):
        monkeypatch.setattr(scoring, "LOGIT_CHUNK", chunk)
        assert vocab_wide_bytes_kept(frozen, batch) == 0


def test_the_fused_loss_keeps_a_bf16_models_dtypes_and_its_gradient(tiny_model, monkeypatch):
    """A bf16 model (as on a GPU): hidden states' gradients come back bf16, and match plain
    autograd's to bf16's precision, in one chunk or several."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.get_output_embeddings().weight.requires_grad_(False)
    batch = collate(examples(6, seed=7), 0)
    vocab = model.get_output_embeddings().weight.shape[0]
    with monkeypatch.context() as m:
        m.setattr(scoring._FrozenHeadCrossEntropy, "apply", plain_cross_entropy)
        reference = loss_and_grads(model, scoring.completion_loss, batch)
    for chunk in (2**62, 3 * vocab):
        monkeypatch.setattr(scoring, "LOGIT_CHUNK", chunk)
        loss, grads = loss_and_grads(model, scoring.completion_loss, batch)
        torch.testing.assert_close(loss, reference[0], rtol=1e-3, atol=1e-3)
        for got, expected in zip(grads, reference[1]):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)
