"""Training at the sizes teams tune: Llama-3.2-1B and Llama-3.1-8B shapes, LoRA and QLoRA,
tuneloop against TRL's SFTTrainer (packing, bf16) on the same data and steps, with
`tuneloop estimate`'s memory and speed predictions beside what was measured.

The models are built from their configs (written below) with random weights and the bundled
SmolLM2 tokenizer, so nothing is downloaded: speed and memory do not depend on the weights'
values. Each configuration runs in its own process (its own peak memory).

    python bench/shapes.py --shapes llama-3.2-1b --steps 3 --skip trl   # CPU: a few steps
    python bench/shapes.py --steps 12                                     # a CUDA machine
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
GPU = torch.cuda.is_available()
SHAPES = {  # from each model's published config.json
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "vocab_size": 128256, "tie_word_embeddings": True,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5},
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "vocab_size": 128256, "tie_word_embeddings": False,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5},
}
EXAMPLES_PER_STEP = 32
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-3
ESTIMATE_GPU = "h200-141gb"


def build(shape: str, folder: Path) -> Path:
    """A model folder of the shape with random weights (bf16) and SmolLM2's tokenizer."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneloop import models

    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    spec = dict(SHAPES[shape])
    spec.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if GPU else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def recipe_for(folder: Path, method: str, steps: int):
    from tuneloop.project import load_recipe

    recipe = load_recipe(DATA / "recipe.yaml")
    return recipe.model_copy(update={
        "base_model": str(folder), "method": method, "max_steps": steps, "epochs": 100,
        "head": "none",  # the answer tokens' loss, as TRL's (not classification's label head)
        "learning_rate": LR, "batch_size": EXAMPLES_PER_STEP, "eval_every": 10_000,
        "checkpoint_every": 10_000})


def peak_mb() -> float:
    if GPU:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tuneloop(folder: Path, method: str, steps: int, out: Path) -> dict:
    from tuneloop.data.splits import load_splits
    from tuneloop.train.methods import WEIGHTS
    from tuneloop.train.sft import run_sft

    recipe = recipe_for(folder, method, steps)
    splits = load_splits(recipe.data, recipe.task)
    result = run_sft(WEIGHTS[method], recipe, splits, out)
    s = result["stats"]
    return {"tokens": s["train_tokens"], "train_s": s["train_s"], "peak_mb": peak_mb(),
            "packing": result["plan"].packing}


def run_trl(folder: Path, method: str, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from train_throughput import train_timed, trl_rows  # beside this file
    from tuneloop import models
    from tuneloop.data.splits import load_splits

    recipe = recipe_for(folder, method, steps)
    splits = load_splits(recipe.data, recipe.task)
    rows = trl_rows(recipe, splits)
    tokenizer = models.load_tokenizer(str(folder))
    # As many tokens a step as tuneloop's EXAMPLES_PER_STEP examples (~50 tokens each), in
    # packed rows of 1024.
    args = SFTConfig(output_dir=str(out / "trl"), max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1000,
                     save_strategy="no", report_to="none", use_cpu=not GPU, seed=0,
                     bf16=GPU, gradient_checkpointing=False, packing=True, max_length=1024,
                     per_device_train_batch_size=max(1, EXAMPLES_PER_STEP * 50 // 1024))
    kw = {"dtype": torch.bfloat16 if GPU else torch.float32}
    if method == "qlora":
        kw.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kw["dtype"]), device_map={"": 0} if GPU else None)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    if GPU and method != "qlora":
        model.to("cuda")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    return {**train_timed(trainer), "peak_mb": peak_mb()}


def predicted(folder: Path, method: str, steps: int) -> dict:
    """tuneloop estimate's peak memory and tokens/s for this run (on the GPU: the H200)."""
    from tuneloop.train.estimate import estimate

    recipe = recipe_for(folder, method, steps)
    row = estimate(recipe, gpu=ESTIMATE_GPU if GPU else None, methods=[method])["methods"][0]
    return {"memory_mb": row["peak_memory_gb"] * 1024, "tokens_per_s": row["tokens_per_s"]}


def child(args) -> None:
    folder = args.out / "models" / args.shape
    out = args.out / f"{args.shape}-{args.method}-{args.child}"
    out.mkdir(parents=True, exist_ok=True)
    run = run_tuneloop if args.child == "tuneloop" else run_trl
    result = run(folder, args.method, args.steps, out)
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--methods", nargs="*", default=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", nargs="*", default=[], help="tuneloop and/or trl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "shapes")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--child")
    parser.add_argument("--shape")
    parser.add_argument("--method")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    where = f"{torch.cuda.get_device_name()}, bf16" if GPU else f"{os.cpu_count()} CPU cores, float32"
    lines = [f"## shapes ({time.strftime('%Y-%m-%d')}, {where})", "",
             f"Random weights in each shape, SmolLM2 tokenizer, banking77 demo subset, "
             f"{args.steps} optimizer steps of {EXAMPLES_PER_STEP} examples (TRL: packed rows "
             "of 1024 tokens, as many tokens a step), LoRA r=16 all-linear.", "",
             "| shape | method | runner | real tokens/s | vs TRL | peak MB | estimated MB "
             "| memory error | estimated tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:  # LoRA at every shape first, then QLoRA
        for shape in args.shapes:
            folder = build(shape, args.out / "models" / shape)
            results = {}
            for runner in ("trl", "tuneloop"):
                if runner in args.skip:
                    continue
                cmd = [sys.executable, __file__, "--child", runner, "--shape", shape,
                       "--method", method, "--steps", str(args.steps), "--out", str(args.out)]
                try:
                    subprocess.run(cmd, check=True, timeout=args.timeout,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                    print(f"{shape} {method} {runner}: failed ({exc})", flush=True)
                    continue
                r = json.loads((args.out / f"{shape}-{method}-{runner}" / "result.json").read_text())
                r["tokens_per_s"] = r["tokens"] / r["train_s"]
                results[runner] = r
                print(f"{shape} {method} {runner}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"peak {r['peak_mb']:.0f} MB", flush=True)
            guess = predicted(folder, method, args.steps)
            for runner, r in results.items():
                ratio = (f"{r['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x"
                         if "trl" in results else "–")
                error = f"{100 * (guess['memory_mb'] / r['peak_mb'] - 1):+.0f}%"
                lines.append(f"| {shape} | {method} | {runner} | {r['tokens_per_s']:.0f} | {ratio} | "
                             f"{r['peak_mb']:.0f} | {guess['memory_mb']:.0f} | {error} | "
                             f"{guess['tokens_per_s']:.0f} |")
            text = "\n".join(lines) + "\n"
            (args.out / "shapes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
