"""Training commands: `train`, `export`, `estimate`, `tune`. cli.py puts them on `tuneloop`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from tuneloop.errors import TuneloopError
from tuneloop.terminal import (JSON_OPT, cell, err, out, print_json, print_metrics,
                               training_progress)

app = typer.Typer()


DEEPSPEED_OPT = typer.Option(
    None, "--deepspeed", metavar="zero2|zero3",
    help="shard across the processes with DeepSpeed ZeRO: zero2 the optimizer state and "
         "gradients, zero3 the weights too (pip install 'tuneloop[deepspeed]')")


def _sharding(fsdp: bool, deepspeed: str | None) -> str | None:
    """The sharding the flags name: "fsdp", "zero2", "zero3" or None."""
    if fsdp and deepspeed:
        raise TuneloopError("--fsdp and --deepspeed are two ways to shard; give one")
    if deepspeed is not None and deepspeed not in ("zero2", "zero3"):
        raise TuneloopError(f"--deepspeed {deepspeed}: use zero2 (optimizer state and gradients "
                            "sharded) or zero3 (the weights as well)")
    return "fsdp" if fsdp else deepspeed


@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML"),
    resume: Optional[str] = typer.Option(None, help="continue this run from its last checkpoint"),
    processes: int = typer.Option(1, min=1, help="data-parallel processes (Accelerate; gloo on "
                                  "CPUs, NCCL on GPUs)"),
    fsdp: bool = typer.Option(False, "--fsdp", help="shard weights, gradients and optimizer "
                              "state across the processes (PyTorch FSDP)"),
    deepspeed: Optional[str] = DEEPSPEED_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train per a recipe, then evaluate on its test data; prints the run id.

    Example: tuneloop train examples/banking77/recipe.yaml --json
             tuneloop train --resume run-20261123-ab12cd   (after an interruption)
             tuneloop train recipe.yaml --processes 2       (data-parallel, Accelerate)
             tuneloop train recipe.yaml --processes 2 --fsdp   (model sharded across them)
             tuneloop train recipe.yaml --processes 2 --deepspeed zero3   (the same, DeepSpeed)

    A minimal recipe:  base_model: smollm2-135m-instruct / task: classify /
    data: {train: train.jsonl, test: test.jsonl} / method: lora
    """
    from tuneloop.project import load_recipe
    from tuneloop.train.run import train as run_train

    if (recipe is None) == (resume is None):
        raise TuneloopError("give a recipe to start a run, or --resume RUN to continue one")
    sharding = _sharding(fsdp, deepspeed)
    parsed = load_recipe(recipe) if recipe else None
    with training_progress() as progress:
        result = run_train(parsed, progress=progress, resume=resume, processes=processes,
                           sharding=sharding, on_phase=lambda p: err.print(f"[dim]{p}[/]"))
    if as_json:
        print_json({k: v for k, v in result.items()})
        return
    print_metrics(result)
    out.print(f"run [bold]{result['run_id']}[/] done ({result['method']}); {result['artifact']}")


@app.command("export")
def export_(
    run_id: str = typer.Argument(..., help="a finished run"),
    out_dir: Path = typer.Option(..., "--out", help="new folder to write"),
    merge: bool = typer.Option(False, help="fold the adapter into the base: a plain model folder"),
    as_json: bool = JSON_OPT,
) -> None:
    """Export a run's adapter, or with --merge a model folder that transformers loads alone.

    Example: tuneloop export run-20261123-ab12cd --out ./my-model --merge
    """
    from tuneloop.train.export import export

    result = export(run_id, out_dir, merge=merge)
    if as_json:
        print_json(result)
        return
    out.print(f"{result['kind']} of {result['run_id']} written to {result['path']}")


@app.command()
def estimate(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    gpu: Optional[str] = typer.Option(None, help="estimate for this GPU instead of this machine "
                                      "(t4-16gb, l4-24gb, a10g-24gb, a100-40gb, a100-80gb, h100-80gb, h200-141gb)"),
    methods: Optional[str] = typer.Option(None, help="comma-separated: lora,dora,qlora,full"),
    tokens_per_s: Optional[float] = typer.Option(None, help="use this training throughput"),
    price: Optional[float] = typer.Option(None, help="USD per hour of the machine (with --gpu: "
                                          "of each GPU)"),
    processes: int = typer.Option(1, min=1, help="memory per process of a data-parallel run"),
    fsdp: bool = typer.Option(False, "--fsdp", help="... with the model sharded across them"),
    deepspeed: Optional[str] = DEEPSPEED_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Memory, time and money of each training method for a recipe, before running it.

    Example: tuneloop estimate examples/banking77/recipe.yaml --gpu a100-80gb
    """
    from tuneloop.train.estimate import estimate as run_estimate, hours
    from tuneloop.project import load_recipe

    result = run_estimate(load_recipe(recipe), gpu=gpu, tokens_per_s=tokens_per_s, price_per_hour=price,
                          methods=methods.split(",") if methods else None,
                          processes=processes, sharding=_sharding(fsdp, deepspeed))
    if as_json:
        print_json(result)
        return
    out.print(f"{result['model']} ({result['parameters'] / 1e6:.0f}M parameters) on {result['device']}: "
              f"{result['train_rows']} rows x {result['epochs']:g} epochs = "
              f"{result['tokens_to_process']:,} tokens; micro-batches of {result['batch_tokens']} tokens",
              highlight=False)
    sharded = f" (sharded: {result['sharding']})" if result["sharding"] else ""
    each = f", per process of {processes}{sharded}" if processes > 1 else ""
    table = Table("method", "trainable", "weights GB", "grads+optim GB", "activations GB",
                  "parallel GB", "peak GB", "fits", "tokens/s", "time", "cost $", "throughput from",
                  title=f"estimate (memory capacity {result['memory_capacity_gb']:.0f} GB{each})")
    for m in result["methods"]:
        mem = m["memory_gb"]
        table.add_row(m["method"], f"{m['trainable_parameters'] / 1e6:.1f}M", f"{mem['weights']:.2f}",
                      f"{mem['gradients'] + mem['optimizer']:.2f}",
                      f"{mem['activations'] + mem['logits']:.2f}",
                      f"{mem['parallel']:.2f}", f"{m['peak_memory_gb']:.2f}", "yes" if m["fits"] else "[red]no[/]",
                      f"{m['tokens_per_s']:.0f}", hours(m["seconds"]), f"{m['cost_usd']:.2f}",
                      m["throughput_source"])
    out.print(table)


@app.command()
def tune(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    trials: int = typer.Option(8, help="how many runs to try"),
    timeout_minutes: Optional[float] = typer.Option(None, help="stop starting trials after this"),
    as_json: bool = JSON_OPT,
) -> None:
    """Search learning rate, LoRA rank, epochs and batch size; write RECIPE.tuned.yaml.

    Example: tuneloop tune examples/banking77/recipe.yaml --trials 8
    """
    from tuneloop.project import load_recipe
    from tuneloop.train.tune import tune as run_tune

    result = run_tune(load_recipe(recipe), recipe, trials, timeout_minutes=timeout_minutes,
                      on_trial=lambda r: err.print(f"[dim]trial {r['trial']}: val loss "
                                                   f"{r['val_loss']:.4f} {r['params']}[/]"))
    if as_json:
        print_json(result)
        return
    table = Table("trial", "state", "val loss", "learning rate", "rank", "epochs", "batch tokens", "run")
    for r in result["trials"]:
        p = r["params"]
        table.add_row(str(r["trial"]), r["state"], cell(r.get("val_loss")), f"{p['learning_rate']:.2e}",
                      str(p.get("lora_rank", "–")), str(p["epochs"]), str(p["batch_tokens"]),
                      r.get("run_id", "–"))
    out.print(table)
    out.print(f"best: trial {result['best']['trial']} (val loss {result['best']['val_loss']:.4f}); "
              f"tuned recipe: {result['tuned_recipe']}", highlight=False)
