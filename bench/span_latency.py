"""Served latency of an extraction by span head against a classification by label head: one
`tuneloop serve` on loopback, the two deployments side by side, requests one at a time.

    python bench/span_latency.py --adapter bench/out/span-context-echo/runs/<id>/adapter

The extraction is a trained WNUT 2017 span-head artifact (bench/span_context.py writes one),
asked with WNUT's test tweets; the classification is the same LoRA weights with a label head
of banking77's 77 labels (random: serving cost does not depend on what a head learned), asked
with banking77's test questions. The two kinds of request alternate, so both meet the same
host noise. Each is a plain `/v1/chat/completions` call as the openai client sends it,
temperature 0; the figures are wall-clock per request on the client's side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from serve_load import BASE, start  # noqa: E402

WNUT = ROOT.parent / "shared" / "data" / "wnut17" / "test.jsonl"
BANKING = ROOT / "examples" / "banking77"


def label_artifact(spans_adapter: Path, folder: Path) -> list[str]:
    """A classifier's artifact: the span artifact's LoRA files, a seeded random label head."""
    from safetensors.torch import save_file

    from tuneloop.core.formats import Example
    from tuneloop.models import load_model
    from tuneloop.models.head import HEAD_FILE
    from tuneloop.tasks import classify

    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(spans_adapter / name, folder / name)
    rows = [json.loads(x) for x in open(BANKING / "train.jsonl", encoding="utf-8")]
    info = classify.describe([Example((), "", label=r["label"]) for r in rows])
    hidden = load_model(BASE).config.hidden_size
    torch.manual_seed(0)
    save_file({"weight": torch.randn(len(info.labels), hidden) * 0.02}, str(folder / HEAD_FILE))
    (folder / "tuneloop.json").write_text(json.dumps({
        "base_model": BASE, "task": info.to_dict(), "method": "lora", "head": "labels"}))
    return list(info.labels)


def deploy_both(ws: Path, spans_adapter: Path) -> str:
    """Both deployments for tenant "bench"; its API key."""
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry

    labels = ws / "adapters" / "labels"
    label_artifact(spans_adapter, labels)
    registry = Registry.open(ws)
    for name, task, path in (("extract", "extract", spans_adapter), ("classify", "classify", labels)):
        run = registry.add_run(task=task, base_model=BASE, method="lora", status="done",
                               recipe={}, adapter_path=str(path))
        deploy(registry, name, run.id, "bench", force=True)
    return create_key(registry, "bench", rate_per_minute=10**6)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, required=True,
                        help="a trained span-head artifact (an adapter folder with span_head.safetensors)")
    parser.add_argument("--requests", type=int, default=100, help="of each kind")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tweets = [json.loads(x)["text"] for x in open(WNUT, encoding="utf-8")][:args.requests]
    questions = [json.loads(x)["text"] for x in open(BANKING / "test.jsonl",
                                                      encoding="utf-8")][:args.requests]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        key = deploy_both(ws, args.adapter.resolve())
        server = start(ws, args.port, [BASE], auth=True, threads=args.threads)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key=key,
                                   max_retries=0)
            times: dict[str, list[float]] = {"classify": [], "extract": []}
            replies: dict[str, list[str]] = {"classify": [], "extract": []}
            for i in range(-2, len(tweets)):  # two untimed rounds first: engines built, warm
                for model, text in (("classify", questions[max(i, 0)]), ("extract", tweets[max(i, 0)])):
                    t = time.perf_counter()
                    reply = client.chat.completions.create(
                        model=model, temperature=0,
                        messages=[{"role": "user", "content": text}])
                    if i >= 0:
                        times[model].append(time.perf_counter() - t)
                        replies[model].append(reply.choices[0].message.content)
        finally:
            server.terminate()
            server.wait()
    assert all(json.loads(r).keys() for r in replies["extract"])  # every reply the JSON shape
    p50 = {k: 1000 * statistics.median(v) for k, v in times.items()}
    mean = {k: 1000 * statistics.fmean(v) for k, v in times.items()}
    print("| request | p50 ms | mean ms | requests |\n|---|---|---|---|")
    for k in times:
        print(f"| {k} | {p50[k]:.1f} | {mean[k]:.1f} | {len(times[k])} |")
    print(f"\nextract / classify at p50: {p50['extract'] / p50['classify']:.2f}x")


if __name__ == "__main__":
    main()
