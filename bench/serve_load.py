"""Serving load test on loopback: many adapters on one shared base vs the same adapters merged
into one model each, served by one process each.

    python bench/serve_load.py --clients 32 --adapters 8 --requests 128 --max-tokens 32

Both sides run tuneloop's own engine, so the difference is the sharing alone: in the shared
setup one process holds the base once and decodes every adapter's rows in one batch; in the
merged setup each of the N processes holds a full model and batches only its own clients.
The adapters are rank-16 LoRA on q/k/v/o/gate/up/down with random (non-zero) weights: serving
cost does not depend on what an adapter learned. Every request is greedy with a fixed
max_tokens; throughput counts the completion tokens the server reports (usage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"
TUNELOOP = [str(Path(sys.executable).parent / "tuneloop")]
VLLM_PYTHON = os.environ.get("TUNELOOP_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")


def make_adapters(ws: Path, n: int) -> list[Path]:
    """n LoRA adapters of the base, saved as tuneloop run artifacts."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneloop import models

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(models.load_model(BASE), LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        folder = ws / "adapters" / f"a{i}"
        model.save_pretrained(folder)
        (folder / "tuneloop.json").write_text(json.dumps({
            "base_model": BASE, "method": "lora", "task": {"kind": "chat", "labels": [], "fields": []}}))
        paths.append(folder)
    return paths


def merged_copies(ws: Path, adapters: list[Path]) -> list[Path]:
    from peft import PeftModel

    from tuneloop import models

    out = []
    for path in adapters:
        model = PeftModel.from_pretrained(models.load_model(BASE), path).merge_and_unload()
        folder = ws / "merged" / path.name
        model.save_pretrained(folder)
        models.load_tokenizer(BASE).save_pretrained(folder)
        out.append(folder)
    return out


def register(ws: Path, adapters: list[Path]) -> str:
    """Deploy each adapter for tenant 'bench' under the name a0..aN; return an API key."""
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry

    registry = Registry.open(ws)
    for path in adapters:
        run = registry.add_run(task="chat", base_model=BASE, method="lora", status="done",
                               recipe={}, adapter_path=str(path))
        deploy(registry, path.name, run.id, "bench", force=True)
    return create_key(registry, "bench", rate_per_minute=10**6)[1]


def start(ws: Path, port: int, bases: list[str], auth: bool, threads: int,
          engine: str = "builtin") -> subprocess.Popen:
    args = [*TUNELOOP, "serve", "--port", str(port), "--no-worker", "--max-batch", "64",
            "--engine", engine]
    if engine == "vllm":  # the adapters are rank 16 and all 8 may share a batch
        args += ["--vllm-python", VLLM_PYTHON, "--vllm-arg=--max-lora-rank=16",
                 "--vllm-arg=--max-loras=8"]
    for b in bases:
        args += ["--base", b]
    if not auth:
        args.append("--no-auth")
    env = dict(os.environ, TUNELOOP_HOME=str(ws), OMP_NUM_THREADS=str(threads),
               TUNELOOP_DB_URL="")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(3000):  # vLLM starts with the server: half a minute here
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


class PeakRss:
    """Sum of the servers' resident memory (their child processes too: vLLM's engine and
    worker), sampled every 0.1 s; the peak is kept."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            procs = [q for p in self.procs for q in (p, *p.children(recursive=True))]
            total = 0
            for q in procs:
                try:
                    total += q.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def load(targets: list[tuple[str, str, str | None]], prompts: list[str], clients: int,
         requests: int, max_tokens: int) -> dict:
    """`requests` chat requests from `clients` threads, request i to targets[i % len]."""
    def one(i):
        url, model, key = targets[i % len(targets)]
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
        headers = {"authorization": f"Bearer {key}"} if key else {}
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        latency = time.perf_counter() - t
        if r.status_code != 200:
            return latency, 0, r.text[:200]
        return latency, r.json()["usage"]["completion_tokens"], None

    for i in range(len(targets)):  # warm-up: every adapter/model loaded once, not timed
        one(i)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    errors = [r[2] for r in results if r[2]]
    tokens = sum(r[1] for r in results)
    return {"requests": requests, "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": requests / wall, "p50_s": statistics.median(latencies),
            "p95_s": pct(0.95), "p99_s": pct(0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8470)
    ap.add_argument("--shared-threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the shared server")
    ap.add_argument("--only", choices=["shared", "merged"], default=None)
    ap.add_argument("--engines", default="builtin",
                    help="engines of the shared server, comma-separated: builtin,vllm")
    args = ap.parse_args()
    prompts = [json.loads(line)["text"] for line in (ROOT / "examples/banking77/test.jsonl").open()]
    ws = Path(tempfile.mkdtemp(prefix="tuneloop-serve-bench-"))
    adapters = make_adapters(ws, args.adapters)
    merged = merged_copies(ws, adapters) if args.only != "shared" else []
    key = register(ws, adapters)
    threads = os.cpu_count() or 1
    out = {"setup": vars(args), "cpu_threads": threads}

    engines = args.engines.split(",")
    if args.only != "merged":
        for engine in engines:
            shared(out, ws, args, adapters, key, prompts, engine)
    if args.only != "shared":
        merged_run(out, ws, args, merged, prompts, threads)
    for engine in engines:
        name = "shared" if engine == "builtin" else f"shared_{engine}"
        if name in out and "merged" in out:
            out[f"{name}_throughput_ratio"] = out[name]["tokens_per_s"] / out["merged"]["tokens_per_s"]
            out[f"{name}_memory_ratio"] = out["merged"]["peak_rss_mb"] / out[name]["peak_rss_mb"]
    print(json.dumps(out, indent=2))


def shared(out, ws, args, adapters, key, prompts, engine="builtin"):
    server = start(ws, args.port, [BASE], auth=True, threads=args.shared_threads, engine=engine)
    url = f"http://127.0.0.1:{args.port}"
    rss = PeakRss([server.pid])
    name = "shared" if engine == "builtin" else f"shared_{engine}"
    out[name] = load([(url, a.name, key) for a in adapters], prompts, args.clients,
                     args.requests, args.max_tokens)
    out[name]["peak_rss_mb"] = rss.stop()
    out[name]["torch_threads"] = args.shared_threads
    server.terminate()  # the server stops vLLM's process group on its way out
    server.wait()


def merged_run(out, ws, args, merged, prompts, threads):
    """One process per merged model; the machine's threads are split between them."""
    per = max(1, threads // len(merged))
    servers = [start(ws, args.port + 1 + i, [str(m)], auth=False, threads=per)
               for i, m in enumerate(merged)]
    rss = PeakRss([s.pid for s in servers])
    out["merged"] = load([(f"http://127.0.0.1:{args.port + 1 + i}", str(m), None)
                          for i, m in enumerate(merged)], prompts, args.clients, args.requests,
                         args.max_tokens)
    out["merged"]["peak_rss_mb"] = rss.stop()
    out["merged"]["torch_threads_each"] = per
    for s in servers:
        s.terminate()
        s.wait()


if __name__ == "__main__":
    main()
