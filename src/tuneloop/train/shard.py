"""Sharded data parallelism: `tuneloop train RECIPE --processes N --fsdp`.

With plain data parallelism (train/distributed.py) every process holds the whole model, its
gradients and AdamW's two moments: 16 bytes per trained parameter on each, which is what stops
full fine-tuning of larger models. PyTorch's FSDP (`fully_shard`, FSDP2) keeps each process's
share of every weight, gradient and optimizer moment instead, gathering a layer's weights only
while that layer runs: the same loop, the same recipe, 1/N of that memory per process. It runs
over gloo on CPUs and NCCL on GPUs.

Each decoder layer is one shard group (the model's own `_no_split_modules`), the embeddings,
final norm and head the root's, whose forward is the loss (`shard_model` returns it). FSDP gathers weights inside every forward and backward, so every process must
run as many of them per step as the others (`passes`), and it averages gradients across
processes, where the loop's per-token loss wants their sum (so each rank's loss is scaled by
the number of processes).
"""

from __future__ import annotations

from typing import Callable

import torch

from tuneloop.train.checkpoint import Whole
from tuneloop.models.scoring import causal_lm


class LossModule(torch.nn.Module):
    """The loss as the root module's forward: FSDP gathers the weights outside the decoder
    layers (embeddings, final norm, head) around a module's forward, and the loop reads the
    decoder and the head separately (only answer positions reach the head)."""

    def __init__(self, model, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def shard_model(model, loss: Callable) -> Callable:
    """Shard `model` in place across the process group; returns `loss(model, batch)` to call
    in its stead (the model's weights are then shards, usable only through it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    layers = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    root = fully_shard(LossModule(model, loss), mesh=mesh)
    return lambda _model, batch: root(batch)


def passes(batches: list, rank: int, world: int) -> list[tuple[object, float]]:
    """This rank's share of a step's micro-batches with their weights, padded with weight-0
    passes so every rank runs the same number of forwards (FSDP gathers weights in each)."""
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    return [(b, 1.0) for b in mine] + [(batches[0], 0.0)] * (rounds - len(mine))


class Sharded(Whole):
    """Checkpoints of a sharded model: its trained weights and optimizer state gathered whole
    to rank 0 for writing (collective: every rank calls), and scattered back when read (every
    rank reads the files). The files hold whole tensors, by parameter name."""

    sharding = "fsdp"

    def weights(self, model) -> dict[str, torch.Tensor]:
        """The trained weights whole, on rank 0 only (one tensor at a time is gathered on
        the others, and dropped): frozen weights are never gathered."""
        import torch.distributed as dist

        keep, whole = dist.get_rank() == 0, {}
        for name, param in model.named_parameters():
            if param.requires_grad:  # (the root's weights may be whole already, after a
                # forward without backward: FSDP keeps them gathered for the backward)
                tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
                if keep:
                    whole[name] = tensor.detach().cpu().contiguous()
        return whole

    def optimizer(self, model, optimizer) -> dict:
        """AdamW's state whole by parameter name, on rank 0 only (the others get none)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights,
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(self, model, optimizer, state: dict, folder=None) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))


SHARDED = Sharded()
