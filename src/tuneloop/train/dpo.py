"""DPO: learn from preference pairs ({prompt, chosen, rejected}) without a reward model.

The policy is a LoRA adapter: fresh on the base model, or continuing a finished SFT run's
adapter (`dpo.start`). The reference is the frozen start point; its log-probabilities of every
pair are computed once before the first step, so no second copy of the weights is kept.
Loss per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi/ref are the
summed log-probabilities of the chosen (c) and rejected (r) replies.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from tuneloop import models
from tuneloop.core.batching import collate, length_grouped_batches, pack
from tuneloop import methods
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.pairs import all_logps, encode_pairs
from tuneloop.models.scoring import dpo_loss
from tuneloop.models.scoring import sequence_logps
from tuneloop.train.lora import attach_lora, save_adapter
from tuneloop.train.objective import Objective
from tuneloop.train.plan import default_epochs
from tuneloop.train.sft import Weights, run_sft



def start_run(recipe, registry=None):
    """The finished adapter run DPO continues (`dpo.start`), checked; None: the base model."""
    if not recipe.dpo.start:
        return None
    from tuneloop import project
    from tuneloop.store import Registry

    run = (registry or Registry.open(project.workspace())).get_run(recipe.dpo.start)
    if run.status != "done" or not methods.method(run.method).continued:
        able = [m.name for m in methods.METHODS.values() if m.continued]
        raise TuneloopError(f"dpo.start must be a finished adapter run ({', '.join(able[:-1])} "
                            f"or {able[-1]}); {run.id} is a {run.status} {run.method} run")
    if run.base_model != recipe.base_model:
        raise TuneloopError(f"dpo.start run {run.id} was trained on {run.base_model}, not "
                            f"{recipe.base_model}; set base_model to match")
    return run


def load_policy(recipe, start=None):
    """The base model, with a trainable copy of the start run's adapter where there is one."""
    base = models.load_model(recipe.base_model)
    if start is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, start.adapter_path, is_trainable=True)


class Preference(Objective):
    """DPO as the loop's objective: an item is a pair (chosen, rejected; the same prompt), a
    micro-batch holds both replies of its pairs with their reference log-probabilities, the
    loss is DPO's summed over the pairs and averaged over the step's pairs. The references
    are the start point's, computed once before the first step (`begin`)."""

    name = "dpo"
    rows = 2

    def __init__(self, beta: float, start=None):
        self.beta, self.start = beta, start
        self.meta = {"beta": beta, "start": start.id if start else None,
                     "start_adapter": start.adapter_path if start else None}

    def encode(self, tokenizer, module, info, examples) -> list:
        return [[chosen, rejected, None] for chosen, rejected in encode_pairs(tokenizer, examples)]

    def size(self, item) -> int:
        return max(len(item[0]), len(item[1]))

    def collate(self, items: list, pad: int) -> dict:
        sequences = [i[0] for i in items] + [i[1] for i in items]  # chosen, then rejected
        batch = pack(sequences, pad, self.row_tokens) if self.row_tokens else collate(sequences, pad)
        batch["reference"] = torch.stack([i[2] for i in items])
        return batch

    def count(self, batch: dict) -> int:
        return len(batch["reference"])

    def epochs(self, n_items: int) -> float:
        return min(default_epochs(n_items), 1.0)

    def begin(self, model, train: list, validation: list, batch_tokens: int, pad: int) -> None:
        # The reference is the start point: a fresh adapter adds nothing yet (B = 0), a start
        # run's adapter is exactly where training begins.
        for items in (train, validation):
            if items:
                pairs = [(i[0], i[1]) for i in items]
                for item, reference in zip(items, all_logps(model, pairs, batch_tokens, pad)):
                    item[2] = reference

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        n = len(batch["reference"])
        logps = sequence_logps(model, batch)
        policy = torch.stack([logps[:n], logps[n:]], dim=1)
        return dpo_loss(policy, batch["reference"].to(policy.device), self.beta).sum(), n

    def validation_loss(self, model):
        return self.loss

    def batches(self, items: list, pad: int, batch_tokens: int) -> list[dict]:
        costs = [self.rows * self.size(i) for i in items]
        return [self.collate([items[i] for i in idx], pad)
                for idx in length_grouped_batches(costs, batch_tokens, 0)]


def run_dpo(recipe, splits, run_dir: Path, progress=None, resume: bool = False,
            registry=None, rank: int = 0, world: int = 1, on_validation=None) -> dict:
    """Train a DPO adapter into run_dir/adapter on the training loop (train/sft.py); returns
    the run's training metrics and the run it started from (None: the base model)."""
    start = start_run(recipe, registry)

    def prepare(model, recipe, plan):
        if start is not None:  # the start run's adapter, already trainable
            return model
        return attach_lora(model, plan.lora_rank, plan.lora_alpha, recipe.lora.dropout,
                           recipe.lora.targets)

    load = partial(load_policy, start=start)
    out = run_sft(Weights("dpo", load, prepare, save_adapter), recipe, splits, run_dir,
                  progress, resume=resume, rank=rank, world=world, on_validation=on_validation,
                  objective=Preference(recipe.dpo.beta, start))
    return {**out, "start": start}
