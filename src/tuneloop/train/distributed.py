"""Data-parallel training across processes, launched by Hugging Face Accelerate.

`train(..., processes=N)` writes the run's recipe to run_dir/launch.json and runs
`accelerate launch --multi_gpu --num_processes N -m tuneloop.train.distributed RUN_DIR`; each
process joins the process group Accelerate sets up (NCCL on GPUs, gloo on CPUs) and runs the
same loop on its share of every step's micro-batches (`run_sft(rank=, world=)`), with
`sharding` the model's training state sharded across them (FSDP: train/shard.py; DeepSpeed
ZeRO-2/3: train/zero.py). Rank 0 writes the artifact and stats; unsharded,
every rank writes the SHA-256 of its final weights, so the launcher can check that all ranks
ended identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tuneloop.errors import TuneloopError
from tuneloop.core.net import free_port


def launch(recipe, run_dir: Path, processes: int, resume: bool = False,
           sharding: str | None = None) -> dict:
    """Run training in `processes` processes (with `sharding` "fsdp", "zero2" or "zero3", the
    model's training state sharded across them); returns rank 0's stats plus the ranks' check."""
    (run_dir / "launch.json").write_text(json.dumps(
        {"recipe": json.loads(recipe.model_dump_json()), "resume": resume, "sharding": sharding}))
    ranks_dir = run_dir / "ranks"
    for old in ranks_dir.glob("*.*") if ranks_dir.exists() else []:
        old.unlink()
    # A free port for the process group: Accelerate's default (29500) would make two runs on one
    # machine (two jobs, two test workers) join each other's group or fail to bind.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "tuneloop.train.distributed", str(run_dir)]
    log = run_dir / "launch.log"
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                  "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))})
    if done.returncode != 0:
        for said in sorted(ranks_dir.glob("*.error")):  # a user's mistake, as a rank put it
            raise TuneloopError(said.read_text())
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise TuneloopError(f"distributed training failed (exit {done.returncode}); the last lines "
                            f"of {log}:\n{tail}")
    stats = json.loads((run_dir / "stats.json").read_text())
    digests = {p.stem: json.loads(p.read_text())["sha256"] for p in sorted(ranks_dir.glob("*.json"))}
    # Sharded, each rank holds only its shards: there is nothing to compare.
    stats.update(processes=processes, sharding=sharding,
                 ranks_identical=None if sharding else len(set(digests.values())) == 1,
                 rank_digests=digests)
    return stats


def main() -> None:
    import torch
    from accelerate import PartialState

    from tuneloop.project import recipe_from_dict
    from tuneloop.train.checkpoint import trainable_state
    from tuneloop.data.splits import load_splits
    from tuneloop.train.methods import Context, trainer

    run_dir = Path(sys.argv[1])
    spec = json.loads((run_dir / "launch.json").read_text())
    recipe = recipe_from_dict(spec["recipe"])
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        splits = load_splits(recipe.data, recipe.task, recipe.fields)
        ctx = Context(resume=spec["resume"], rank=state.process_index,
                      world=state.num_processes, shard=spec["sharding"])
        out = trainer(recipe.method).train(recipe, splits, run_dir, ctx)
    except TuneloopError as e:  # the launcher shows it as it is, not a rank's traceback
        (run_dir / "ranks").mkdir(exist_ok=True)
        (run_dir / "ranks" / f"rank-{state.process_index}.error").write_text(str(e))
        sys.exit(1)
    if out["model"] is not None:  # sharded, only rank 0 holds the whole model
        digest = hashlib.sha256()
        for name, tensor in sorted(trainable_state(out["model"]).items()):
            digest.update(name.encode())
            digest.update(tensor.float().cpu().numpy().tobytes())
        (run_dir / "ranks").mkdir(exist_ok=True)
        (run_dir / "ranks" / f"rank-{state.process_index}.json").write_text(
            json.dumps({"sha256": digest.hexdigest()}))
    if state.is_main_process:
        (run_dir / "stats.json").write_text(json.dumps(out["stats"]))
    state.wait_for_everyone()
    # Left to the interpreter's exit, the group's threads can be torn down mid-run: a rank then
    # aborts ("terminate called without an active exception") after finishing its work.
    state.destroy_process_group()


if __name__ == "__main__":
    main()
