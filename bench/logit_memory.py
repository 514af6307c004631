"""Memory of the loss at long answers and a 128k vocabulary: one LoRA training step's forward
and backward pass, tuneloop (answer logits a chunk at a time, the frozen head's gradient
formed in the forward pass: models/scoring.py) against tuneloop before chunks (every answer
row's logits at once, plain autograd) and TRL's SFTTrainer.compute_loss (full-vocabulary
logits at every token, plus its entropy and token accuracy), on the same micro-batch.

The model is Llama-3.2-1B's width and vocabulary (bench/shapes.py) with `--layers` decoder
layers and random weights: the output head's memory does not depend on depth. Each
configuration runs in its own process; memory is the step's peak above what the process held
before it (peak RSS counted from the step's start on a CPU, peak allocated on a GPU).

    python bench/logit_memory.py                                  # CPU
    python bench/logit_memory.py --rows 16 --answer 512 --layers 16   # a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GPU = torch.cuda.is_available()
CONFIGS = ["tuneloop", "tuneloop-whole", "trl"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_mb() -> float:
    return torch.cuda.memory_allocated() / 2**20 if GPU else rss_mb()


def reset_peak() -> None:
    """Start the peak over from what is held now (on Linux, `5` to clear_refs resets the
    process's high-water RSS): building the model peaks above any step of a few hundred
    answer tokens."""
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_mb() -> float:
    if GPU:
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def model_and_batch(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from shapes import LORA, SHAPES  # beside this file
    from tuneloop.core.tokenize import IGNORE

    spec = dict(SHAPES[args.shape], num_hidden_layers=args.layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if GPU else "cpu"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if GPU else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    model.train()
    length = args.prompt + args.answer
    ids = torch.randint(10, config.vocab_size, (args.rows, length))
    labels = ids.clone()
    labels[:, :args.prompt] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, {k: v.to(model.device) for k, v in batch.items()}


def step_fn(name: str, model, args):
    """A function of the batch that returns the step's loss (mean over answer tokens)."""
    from tuneloop.models import scoring

    if name.startswith("tuneloop"):
        if name == "tuneloop-whole":  # as before chunks: every answer row's logits kept
            scoring.LOGIT_CHUNK = 2**62
            scoring._FrozenHeadCrossEntropy.apply = lambda h, w, b, t, size: F.cross_entropy(
                F.linear(h, w, b).float(), t, reduction="none")
        return lambda batch: (lambda s, n: s / n)(*scoring.completion_loss(model, batch))
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tuneloop import models

    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "hello"}]}]
    trainer = SFTTrainer(model=model, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows),
                         args=SFTConfig(output_dir=str(args.out / "trl"), report_to="none",
                                        use_cpu=not GPU, bf16=GPU, max_steps=1))

    def loss(batch):
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=GPU):
            return trainer.compute_loss(model, dict(batch))

    return loss


def child(args) -> None:
    model, batch = model_and_batch(args)
    loss_fn = step_fn(args.child, model, args)
    before = held_mb()
    reset_peak()
    started = time.perf_counter()
    loss = loss_fn(batch)
    loss.backward()
    if GPU:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    memory = peak_mb() - before
    seconds = []
    for _ in range(args.steps):  # the steady time, after the first step's allocations
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        loss_fn(batch).backward()
        if GPU:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    result = {"step_mb": memory, "first_s": first_s, "step_s": min(seconds) if seconds else first_s,
              "loss": float(loss.detach())}
    (args.out / f"{args.child}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--answer", type=int, default=192)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "logit_memory")
    parser.add_argument("--child")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return
    from tuneloop.models.scoring import LOGIT_CHUNK

    where = (f"{torch.cuda.get_device_name()}, bf16" if GPU
             else f"{os.cpu_count()} CPU cores, float32")
    answers = args.rows * args.answer
    lines = [f"## logit_memory ({time.strftime('%Y-%m-%d')}, {where})", "",
             f"Command: `{' '.join(['python bench/logit_memory.py', *sys.argv[1:]])}`",
             "",
             f"{args.shape} width and vocabulary, {args.layers} layers, LoRA r=16 all-linear; "
             f"one micro-batch of {args.rows} rows of {args.prompt} prompt + {args.answer} answer "
             f"tokens ({answers} answer tokens). tuneloop's chunk: {LOGIT_CHUNK:,} logits.", "",
             "| configuration | step memory MB | vs TRL | step s | vs TRL | loss |",
             "|---|---|---|---|---|---|"]
    results = {}
    for name in CONFIGS:
        if name in args.skip:
            continue
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        results[name] = json.loads((args.out / f"{name}.json").read_text())
        print(name, results[name], flush=True)
    base = results.get("trl")
    for name, r in results.items():
        memory = f"{r['step_mb'] / base['step_mb']:.2f}x" if base else "–"
        speed = f"{r['step_s'] / base['step_s']:.2f}x" if base else "–"
        lines.append(f"| {name} | {r['step_mb']:.0f} | {memory} | {r['step_s']:.2f} | {speed} "
                     f"| {r['loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "logit_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
