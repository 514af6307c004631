"""The built-in generation engine: continuous batching of many adapters over one base model.

One thread owns the model. Each step it admits waiting requests (their prompts are run
through the model together, left-padded, and their KV caches are joined to the running
batch), then advances every running sequence by one token in a single forward pass. Rows
for different adapters share that pass: the stacked-LoRA layers (adapters.py) apply each
row's own adapter. A sequence leaves the batch the moment it finishes, and
its place is free for the next request: no request waits for a slower neighbour's reply.

Streaming is the only way out: every new piece of text is handed to the request's `emit`
callback; a non-streaming reply is the collected stream.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import DynamicCache

from tuneloop.models import head as label_head
from tuneloop.serve import batch_cache
from tuneloop.serve.adapters import BASE, AdapterPool
from tuneloop.serve.sampling import GrammarMatcher, sample
from tuneloop.tasks.labels import HeadMatcher, HeadTrie, LabelMatcher, LabelTrie

log = logging.getLogger("tuneloop.serve")


@dataclass
class Sampling:
    """How one request's tokens are chosen (OpenAI's parameters)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: object | None = None  # an xgrammar CompiledGrammar: the reply must match it


@dataclass
class Request:
    """A prompt to complete `n` times with one adapter; events go to `emit` from the engine thread.

    Events: ("text", choice, str) for new text, ("done", choice, finish_reason, n_tokens,
    confidence) when a choice ends (confidence: the label's probability when the reply was held
    to a label set, else None), ("error", message) if the engine failed it.
    """

    prompt: list[int]
    sampling: Sampling
    emit: Callable[..., None]
    adapter: str = BASE
    adapter_path: Path | None = None
    n: int = 1
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    request: Request
    choice: int
    generator: torch.Generator
    matcher: object | None  # GrammarMatcher or tasks.labels.LabelMatcher: constrain/accept/done
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # real tokens in the KV cache for this row
    sent: int = 0  # characters of text already emitted
    done: bool = False


def _release_memory() -> None:
    """Return the allocator's free memory to the system (glibc's malloc_trim; elsewhere
    nothing). A batch's KV cache and activations grow with its rows, and glibc keeps what a
    burst of 8 rows freed (+50 MB measured in the API process) until it is trimmed."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class Engine:
    """One base model and its adapters, served by one batching thread."""

    def __init__(self, model, tokenizer, max_batch: int = 32, prefill_tokens: int = 4096,
                 adapter_budget_bytes: int = 512 * 2**20, name: str = "engine"):
        self.tokenizer = tokenizer
        self.pool = AdapterPool(model, adapter_budget_bytes)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.context = _context_length(model, tokenizer)
        self.vocab = model.get_output_embeddings().weight.shape[0]  # logits width
        self.stop_ids = _stop_token_ids(model, tokenizer)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.tokens_generated = 0
        self._grammars = None
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def model(self):
        return self.pool.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    def submit(self, request: Request) -> None:
        """Queue a request; its events arrive on request.emit from the engine thread."""
        self.waiting.put(request)
        self._wake.set()

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def status(self) -> dict:
        """What /health and /metrics report of this engine."""
        return {"engine": "builtin", "running": len(self.rows), "queued": self.queue_depth(),
                "adapters": list(self.pool.resident)}

    def compile_grammar(self, schema: str | None, started=None, wait_s: float | None = None):
        """The grammar a reply must match: a JSON schema's, or any JSON object's (None); the
        engine keeps those it compiled within a bound in bytes (`grammars`), and compiles one
        at a time (`started` is set when this one's compile begins; `wait_s`: how long to wait
        for another's)."""
        return self.grammars().get(schema, started, wait_s)

    def grammars(self):
        """This engine's compiled grammars (the compiler is built once: it indexes the
        vocabulary)."""
        if self._grammars is None:
            from tuneloop.tasks import extract

            self._grammars = extract.GrammarCache(extract.grammar_compiler(
                self.tokenizer, self.vocab, self.stop_ids), extract.GRAMMAR_CACHE_BYTES)
        return self._grammars

    # --- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        busy = False  # (since the engine was last idle)
        while not self._stop:
            if not self.rows and self.waiting.empty():
                if busy:  # a burst has ended: give its working memory back
                    _release_memory()
                    busy = False
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            busy = True
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.rows:
                        self._decode()
            except Exception as exc:  # a failed step fails its requests, never the server
                log.exception("generation step failed")
                for row in self.rows:
                    row.request.emit("error", f"generation failed: {exc}")
                self.rows, self.cache, self.mask = [], None, None

    def _admit(self) -> None:
        """Move waiting requests into the batch while rows and the prefill budget allow."""
        new: list[_Row] = []
        budget = self.prefill_tokens
        while len(self.rows) + len(new) < self.max_batch and not self.waiting.empty():
            request = self.waiting.queue[0]
            cost = len(request.prompt) * request.n
            if new and cost > budget:
                break
            self.waiting.get()
            if request.cancelled:
                continue
            budget -= cost
            pinned = {r.request.adapter for r in self.rows + new}
            try:
                self.pool.ensure(request.adapter, request.adapter_path, pinned)
            except Exception as exc:
                log.exception("adapter %s failed to load", request.adapter)
                request.emit("error", f"adapter '{request.adapter}' failed to load: {exc}")
                continue
            try:  # a request that cannot be set up fails alone: it is off the queue already
                new.extend(self._rows_for(request))
            except Exception as exc:
                log.exception("request setup failed")
                request.emit("error", f"generation failed: {exc}")
        if not new:
            return
        try:
            self._prefill(new)
        except Exception as exc:  # the running batch is untouched: only the newcomers fail
            log.exception("prefill failed")
            for request in {id(r.request): r.request for r in new}.values():
                request.cancelled = True  # if they had joined the batch, the next step drops them
                request.emit("error", f"generation failed: {exc}")

    def _rows_for(self, request: Request) -> list[_Row]:
        rows = []
        for choice in range(request.n):
            # torch seeds are 64-bit; the API bounds seeds to int64, and the choice offset
            # wraps rather than overflowing at the top of that range.
            seed = ((request.sampling.seed + choice) % 2**64 if request.sampling.seed is not None
                    else random.getrandbits(62))
            generator = torch.Generator().manual_seed(seed)
            grammar, matcher = request.sampling.grammar, None
            if isinstance(grammar, HeadTrie):  # a classifier deciding with its label head
                matcher = HeadMatcher(grammar)
            elif isinstance(grammar, LabelTrie):  # a classifier: one of its labels, nothing else
                matcher = LabelMatcher(grammar)
            elif grammar is not None:
                matcher = GrammarMatcher(grammar, self.vocab)
            rows.append(_Row(request, choice, generator, matcher))
        return rows

    def _forward(self, ids, mask, positions, rows, cache, hidden: bool = False):
        """(next-token logits, the cache) and, with `hidden`, each row's final hidden states
        pooled as a label head reads them (models/head.py)."""
        self.pool.select([r.request.adapter for r in rows])  # each row its own adapter (or none)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1,
                         output_hidden_states=hidden)
        pooled = label_head.pool(out.hidden_states[-1], mask) if hidden else None
        return out.logits[:, -1, :].float(), out.past_key_values, pooled

    def _prefill(self, new: list[_Row]) -> None:
        width = max(len(r.request.prompt) for r in new)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(new), width), pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, row in enumerate(new):
            prompt = row.request.prompt
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
            row.length = len(prompt)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        heads = [i for i, r in enumerate(new) if isinstance(r.matcher, HeadMatcher)]
        logits, cache, hidden = self._forward(ids.to(self.device), mask.to(self.device),
                                              positions.to(self.device), new, DynamicCache(),
                                              hidden=bool(heads))
        for i in heads:
            row = new[i]
            try:
                row.matcher.decide(hidden[i], row.request.sampling.temperature, row.generator)
            except Exception as exc:  # fails this request alone; _advance drops its rows
                log.exception("a label head failed")
                row.request.cancelled = True
                row.request.emit("error", f"generation failed: {exc}")
        self.cache, self.mask = batch_cache.join_rows(self.cache, self.mask, cache,
                                                      mask.to(self.device))
        self.rows.extend(new)
        self._advance(new, logits)

    def _decode(self) -> None:
        ids = torch.tensor([[r.next_token] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache, _ = self._forward(ids, self.mask, positions, self.rows, self.cache)
        for row in self.rows:
            row.length += 1
        self._advance(self.rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, emit its new text, and drop the rows that ended."""
        for i, row in enumerate(rows):
            if row.request.cancelled:
                row.done = True
                continue
            try:  # one row's failure (its grammar, its text) ends its request, not the batch
                token = sample(logits[i], row)
                row.tokens.append(token)
                row.next_token = token
                self.tokens_generated += 1
                finish = self._finish_reason(row, token)
                finish = self._emit_text(row, finish)
            except Exception as exc:
                log.exception("a row failed")
                row.request.cancelled = True  # its other choices leave at their next step
                row.request.emit("error", f"generation failed: {exc}")
                row.done = True
                continue
            if finish:
                confidence = row.matcher.confidence if row.matcher is not None else None
                row.request.emit("done", row.choice, finish, len(row.tokens), confidence)
                row.done = True
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.cache, self.mask = batch_cache.keep_rows(self.cache, self.mask, keep)

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in self.stop_ids or (row.matcher is not None and row.matcher.done()):
            return "stop"
        if len(row.tokens) >= row.request.sampling.max_tokens or row.length + 1 >= self.context:
            return "length"
        return None

    def _emit_text(self, row: _Row, finish: str | None) -> str | None:
        """Emit the row's new text, holding back what may be the start of a stop string or an
        unfinished multi-byte character. A stop string ends the choice and is not sent."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stops = row.request.sampling.stop
        hits = [at for at in (text.find(s) for s in stops) if at >= 0]
        if hits:
            text, finish = text[:min(hits)], "stop"
        end = len(text)
        if not finish:
            end -= max((len(s) - 1 for s in stops), default=0)
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        if end > row.sent:
            row.request.emit("text", row.choice, text[row.sent:end])
            row.sent = end
        return finish


def _stop_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def _context_length(model, tokenizer) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)


@dataclass
class Choice:
    """One finished choice of a request."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    confidence: float | None = None


def complete(engine: Engine, prompt: list[int], sampling: Sampling, adapter: str = BASE,
             adapter_path: Path | None = None, n: int = 1, timeout: float = 600) -> list[Choice]:
    """Blocking: submit one request and collect its stream into `n` choices."""
    choices = [Choice() for _ in range(n)]
    finished = threading.Event()
    errors: list[str] = []

    def emit(kind, *args):
        if kind == "text":
            choices[args[0]].text += args[1]
        elif kind == "done":
            choice = choices[args[0]]
            choice.finish_reason, choice.tokens, choice.confidence = args[1], args[2], args[3]
            if all(c.finish_reason for c in choices):
                finished.set()
        else:
            errors.append(args[0])
            finished.set()

    engine.submit(Request(prompt, sampling, emit, adapter, adapter_path, n))
    if not finished.wait(timeout):
        raise TimeoutError(f"no reply in {timeout} s")
    if errors:
        raise RuntimeError(errors[0])
    return choices
