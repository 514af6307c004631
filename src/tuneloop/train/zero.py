"""ZeRO sharding with DeepSpeed: `tuneloop train RECIPE --processes N --deepspeed zero2|zero3`.

The same loop and recipe as plain data parallelism (train/distributed.py) and FSDP
(train/shard.py), with DeepSpeed's ZeRO partitioning the state every process would otherwise
hold whole: ZeRO-2 AdamW's moments, master weights and gradients (each process keeps 1/N of
them, the model's weights whole), ZeRO-3 the weights as well (gathered layer by layer while
they run, like FSDP). It runs over gloo on CPUs and NCCL on GPUs.

DeepSpeed owns the backward and the optimizer step (`engine.backward`, `engine.step`), so the
loop hands them over; gradients are reduced in every backward, so every process runs as many
passes per step as the others (`shard.passes`), and DeepSpeed averages them across processes
where the loop's per-token loss wants their sum (each rank's loss is scaled by N, as for FSDP).
Accumulation is the loop's (`managed_gradient_accumulation: false`: every `step()` is a
boundary), clipping DeepSpeed's at the loop's norm, and the learning-rate schedule the loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from tuneloop.errors import TuneloopError
from tuneloop.train.checkpoint import Whole
from tuneloop.train.shard import LossModule

STAGES = {"zero2": 2, "zero3": 3}
TAG = "zero"  # DeepSpeed's folder inside a checkpoint
BUCKET = 1 << 25
"""Elements per gradient-reduction and gathering bucket, and at most this many weights gathered
at once at stage 3 (128 MB in float32; DeepSpeed's defaults, 5e8 and 1e9, exceed a small
model's whole gradient and weights). `tuneloop estimate` counts one reduction bucket."""


def initialize(model, loss: Callable, optimizer, stage: int, max_norm: float = 1.0):
    """Partition `model`'s training state (and, at stage 3, its weights) across the process
    group; returns the DeepSpeed engine, whose forward is `loss(model, batch)`."""
    import deepspeed

    if not torch.cuda.is_available():
        # On CPUs DeepSpeed would compile its shared-memory all-reduce on first use (a C++ build
        # of about a minute that needs a compiler); gloo's, which every other mode uses, serves.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # the loop accumulates; step() is a boundary
        "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET,
                              "allgather_bucket_size": BUCKET,
                              "stage3_max_live_parameters": BUCKET,
                              "stage3_prefetch_bucket_size": BUCKET},
        "gradient_clipping": max_norm,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as in every other run
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=LossModule(model, loss), optimizer=optimizer,
                                      config=config, dist_init_required=False)
    return engine


def held(model) -> int:
    """Weights this process holds: its partitions at stage 3, every weight at stage 2."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
               for p in model.parameters())


class Zero(Whole):
    """Checkpoints of a ZeRO run. The trained weights are gathered whole by parameter name into
    trainable.safetensors (rank 0 writes; every rank calls: gathering is collective); the
    optimizer's partitions are DeepSpeed's own files, one per process, in the checkpoint's
    zero/ folder (every rank writes its own), so a run resumes with as many processes."""

    def __init__(self, engine, sharding: str):
        self.engine, self.sharding = engine, sharding

    def weights(self, model) -> dict[str, torch.Tensor]:
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param

        keep, whole = dist.get_rank() == 0, {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                tensor = safe_get_full_fp32_param(param)  # the master copy the optimizer steps
                if keep:
                    whole[name] = tensor.detach().cpu().contiguous()
        return whole

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        """Nothing: DeepSpeed's own files (load_optimizer) restore both copies it keeps, the
        optimizer's master weights and the model's. (Setting them by hand breaks on weights
        that do not split evenly across the processes.) A run's best weights, with early
        stopping, are read from their file by rank 0 (sft.py), never scattered."""

    def optimizer(self, model, optimizer) -> None:
        return None  # written by every rank in save_own

    def save_own(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_optimizer(self, model, optimizer, state, folder: Path | None = None) -> None:
        import torch.distributed as dist

        parts = sorted((folder / TAG).glob("*optim_states.pt"))
        if len(parts) != dist.get_world_size():
            raise TuneloopError(f"{folder} holds the optimizer of {len(parts)} processes; resume "
                                f"it with --processes {len(parts)}")
        self.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


def step(engine, scheduler) -> None:
    """Reduce the step's gradients, clip them, step AdamW and the schedule, drop them."""
    engine.step()
    scheduler.step()
