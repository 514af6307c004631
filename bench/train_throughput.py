"""Training throughput: tuneloop vs TRL's SFTTrainer + PEFT, same model, data and LoRA settings.

Runs every configuration in its own process (so peak RSS is that configuration's own), in one
session, and measures this machine's float32 matmul rate in the same run. Reports real
(non-padding) training tokens/s, peak RSS, and the validation loss after training, all
computed the same way (tuneloop's completion-only loss on a freshly loaded model + adapter).

    python bench/train_throughput.py                 # all configurations, writes bench/out/
    python bench/train_throughput.py --steps 12 --skip trl-defaults
    python bench/train_throughput.py --steps 40          # on a CUDA machine: bf16, ~8k-token steps

The float32 limit is the matmul rate divided by the FLOPs of a LoRA training token:
4 x parameters (2N forward, 2N for activation gradients; frozen weights need no weight
gradients). tuneloop forms logits only at answer tokens, so it does less than 4N per token
and the fraction can exceed what a full-logits loop could reach.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "banking77"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-3
GPU = torch.cuda.is_available()
# tuneloop's token budget per step (768 on a CPU, 8192 on a GPU) holds ~10 / ~100 rows of this
# data; TRL gets the same number of rows per step.
ROWS_PER_STEP = 100 if GPU else 10
PACK_LENGTH = 768 if GPU else 384  # TRL's packed sequence: a GPU step holds ~4, a CPU step 1
BATCH_TOKENS = int(os.environ.get("BENCH_BATCH_TOKENS", 0)) or None  # tuneloop's default
# tuneloop with padded rows (packing: off) and packed rows (packing: on); `auto` picks one by
# device (train/plan.py default_packing, from this bench).
# "-compiled": torch.compile on both sides (tuneloop: `compile: true`; TRL: torch_compile).
CONFIGS = ["tuneloop", "tuneloop-packed", "tuneloop-compiled", "trl-best", "trl-packing",
           "trl-packing-compiled", "trl-defaults"]
WARM_STEPS = 2  # steps left out of the steady rate (compilation, allocator warm-up)


def matmul_gflops(seconds: float = 3.0) -> float:
    """GEMM rate at the model's layer shapes: float32 on a CPU, bfloat16 on a GPU."""
    from tuneloop.train.estimate import matmul_rate

    return matmul_rate(seconds, gpu=GPU) / 1e9


def peak_memory_mb() -> float:
    """Peak GPU memory on a GPU, else peak RSS."""
    if GPU:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_splits():
    from tuneloop.project import load_recipe
    from tuneloop.data.splits import load_splits as _load

    recipe = load_recipe(DATA / "recipe.yaml")
    return recipe, _load(recipe.data, recipe.task)


def run_tuneloop(steps: int, out: Path, packing: str = "off", compile: bool = False) -> dict:
    from tuneloop.train.lora import run_lora

    recipe, splits = load_splits()
    # Enough epochs that every configuration runs exactly `steps` optimizer steps, each of
    # as many examples as TRL's; the answer tokens' loss, as TRL's (not the label head that
    # classification takes by default, which trains on prompt tokens only).
    recipe = recipe.model_copy(update={"max_steps": steps, "learning_rate": LR, "epochs": 100,
                                       "head": "none",
                                       "batch_size": ROWS_PER_STEP, "packing": packing,
                                       "compile": compile,
                                       "batch_tokens": BATCH_TOKENS, "eval_every": 10_000,
                                       "checkpoint_every": 10_000})
    start = time.perf_counter()
    result = run_lora(recipe, splits, out)
    wall = time.perf_counter() - start
    peak = peak_memory_mb()
    stats = result["stats"]
    return {"tokens": stats["train_tokens"], "train_s": stats["train_s"], "peak_rss_mb": peak,
            "steady_tokens_per_s": stats["steady_tokens_per_s"],
            "adapter": str(out / "adapter"), "wall_s": wall, "steps": stats["steps"]}


def packed_rows(recipe, splits) -> int:
    """TRL's packed sequences a step that hold about ROWS_PER_STEP examples, as tuneloop's."""
    from tuneloop import models, tasks
    from tuneloop.core.tokenize import encode

    module = tasks.TASKS[recipe.task]
    tok = models.load_tokenizer(recipe.base_model)
    mean = sum(len(encode(tok, module.prompt(e, splits.info), module.target(e, splits.info)))
               for e in splits.train) / len(splits.train)
    return max(1, round(ROWS_PER_STEP * mean / PACK_LENGTH))


def trl_rows(recipe, splits) -> list[dict]:
    """The training rows as TRL's prompt-completion dataset: tuneloop's prompts and targets."""
    from tuneloop import tasks

    module = tasks.TASKS[recipe.task]
    return [{"prompt": module.prompt(e, splits.info),
             "completion": [{"role": "assistant", "content": module.target(e, splits.info)}]}
            for e in splits.train]


def train_timed(trainer) -> dict:
    """Run `trainer.train()`; the real tokens it trained on (a padding-free batch carries no
    mask: every token is real), its training seconds and its steady rate after WARM_STEPS."""
    from transformers import TrainerCallback

    per_step, collate, clock = [], trainer.data_collator, {"steps": []}

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        per_step.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            clock["steps"].append(time.perf_counter())

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    trainer.train()
    ends = clock["steps"]
    steady = (sum(per_step[WARM_STEPS:len(ends)]) / (ends[-1] - ends[WARM_STEPS - 1])
              if len(ends) > WARM_STEPS else None)
    # (the data loader collates one batch ahead: the last one counted was never trained on)
    return {"tokens": sum(per_step[:len(ends)]), "train_s": clock["end"] - clock["start"],
            "steady_tokens_per_s": steady}


def run_trl(config: str, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneloop import models

    recipe, splits = load_splits()
    rows = trl_rows(recipe, splits)
    common = dict(output_dir=str(out / "trl"), max_steps=steps, learning_rate=LR,
                  lr_scheduler_type="cosine", warmup_steps=max(1, round(0.05 * steps)), logging_steps=1000,
                  save_strategy="no", report_to="none", use_cpu=not GPU, seed=0)
    if config == "trl-defaults":
        # TRL's own defaults (bf16 autocast, gradient checkpointing, batch 8).
        args = SFTConfig(**common)
    elif config == "trl-best":  # float32 on a CPU (bf16 is slow there), bf16 on a GPU
        args = SFTConfig(**common, bf16=GPU, gradient_checkpointing=False,
                         per_device_train_batch_size=ROWS_PER_STEP,
                         train_sampling_strategy="group_by_length")
    else:  # trl-packing: best-fit packed sequences (padding-free), ~ROWS_PER_STEP examples a step
        args = SFTConfig(**common, bf16=GPU, gradient_checkpointing=False, packing=True,
                         max_length=PACK_LENGTH,
                         per_device_train_batch_size=packed_rows(recipe, splits),
                         torch_compile=config.endswith("-compiled"))
    tokenizer = models.load_tokenizer(recipe.base_model)
    model = models.load_model(recipe.base_model, dtype=None if GPU else torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora)
    timed = train_timed(trainer)
    peak = peak_memory_mb()
    trainer.model.save_pretrained(out / "adapter")
    return {**timed, "peak_rss_mb": peak, "adapter": str(out / "adapter"), "steps": steps}


def validation_loss(adapter: str) -> float:
    """The same completion-only loss for every configuration, on a fresh model + adapter."""
    from peft import PeftModel

    from tuneloop import models, tasks
    from tuneloop.core.batching import collate, length_grouped_batches
    from tuneloop.core.tokenize import encode
    from tuneloop.models.scoring import mean_loss

    recipe, splits = load_splits()
    module = tasks.TASKS[recipe.task]
    tok = models.load_tokenizer(recipe.base_model)
    model = PeftModel.from_pretrained(models.load_model(recipe.base_model), adapter)
    enc = [encode(tok, module.prompt(e, splits.info), module.target(e)) for e in splits.validation]
    batches = length_grouped_batches([len(x) for x in enc], 2048, seed=0)
    return mean_loss(model, [collate([enc[i] for i in b], tok.pad_token_id) for b in batches])


def child(config: str, steps: int, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    if config == "trl-defaults" and not GPU:
        steps = 1  # ~5 minutes a step on a CPU
    if config.startswith("tuneloop"):
        result = run_tuneloop(steps, out, "off" if config == "tuneloop" else "on",
                              compile=config == "tuneloop-compiled")
    else:
        result = run_trl(config, steps, out)
    result["val_loss"] = validation_loss(result["adapter"])
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out / args.child)
        return
    from tuneloop.models import catalog, resolve

    resolve("smollm2-135m-instruct")  # convert once, outside the timed processes
    params = catalog()["smollm2-135m-instruct"].parameters
    gflops = matmul_gflops()
    limit = gflops * 1e9 / (4 * params)
    results = {}
    for config in CONFIGS:
        if config in args.skip:
            continue
        (args.out / config).mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, __file__, "--child", config, "--steps",
                            str(args.steps), "--out", str(args.out)], check=True,
                           timeout=args.timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"{config}: failed ({exc})", flush=True)
            continue
        r = json.loads((args.out / config / "result.json").read_text())
        r["tokens_per_s"] = r["tokens"] / r["train_s"]
        results[config] = r
        print(f"{config}: {r['tokens_per_s']:.1f} tokens/s ({r['steady_tokens_per_s'] or 0:.1f} "
              f"steady), peak RSS {r['peak_rss_mb']:.0f} MB, val loss {r['val_loss']:.3f}", flush=True)
        report(results, gflops, limit, args.steps, quiet=True)  # so far
    report(results, gflops, limit, args.steps)


def report(results: dict, gflops: float, limit: float, steps: int, quiet: bool = False) -> None:
    best_trl = max((r["tokens_per_s"] for c, r in results.items() if c.startswith("trl")), default=None)
    best_steady = max((r["steady_tokens_per_s"] or 0 for c, r in results.items()
                       if c.startswith("trl")), default=None)
    import torch

    where = (f"{torch.cuda.get_device_name()}, bf16" if GPU else f"{os.cpu_count()} CPU cores, float32")
    dtype, memory = ("bf16", "peak GPU MB") if GPU else ("float32", "peak RSS MB")
    lines = [f"## train_throughput ({time.strftime('%Y-%m-%d')}, {where})", "",
             f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, lr {LR}, banking77 demo subset, "
             f"{steps} optimizer steps of ~{ROWS_PER_STEP} examples"
             + ("." if GPU else " (TRL defaults: 1 step of 8)."),
             f"Machine {dtype} matmul: {gflops:.1f} GFLOP/s → LoRA limit {limit:.0f} tokens/s "
             "(4 x params FLOPs per token).", "",
             f"Steady: after the first {WARM_STEPS} steps (where compilation happens).", "",
             f"| configuration | tokens/step | real tokens/s | vs best TRL | steady tokens/s "
             f"| vs best TRL | % of {dtype} limit | {memory} | val loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config, r in results.items():
        ratio = f"{r['tokens_per_s'] / best_trl:.2f}x" if best_trl else "–"
        steady = r["steady_tokens_per_s"]
        steady_ratio = f"{steady / best_steady:.2f}x" if best_steady and steady else "–"
        lines.append(f"| {config} | {r['tokens'] / r['steps']:.0f} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{steady or 0:.1f} | {steady_ratio} | "
                     f"{100 * r['tokens_per_s'] / limit:.0f}% | {r['peak_rss_mb']:.0f} | {r['val_loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    if not quiet:
        print(text)
    target = ROOT / "bench" / "out" / ("train_throughput_gpu.md" if GPU else "train_throughput.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


if __name__ == "__main__":
    main()
