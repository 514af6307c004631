"""OpenAI-compatible inference: /v1/models, /v1/chat/completions and /v1/completions.

One generation path: a request becomes a stream of chunks; a streaming reply sends them as
server-sent events, a non-streaming reply is the same chunks collected into one object.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneloop import tasks
from tuneloop.core.formats import Example
from tuneloop.core.tokenize import prompt_ids
from tuneloop.serve import feedback
from tuneloop.serve.auth import CallerDep
from tuneloop.serve.errors import ApiError, error_body
from tuneloop.serve.engine import Request as EngineRequest
from tuneloop.serve.engine import Sampling
from tuneloop.serve.router import NotFound, Target
from tuneloop.serve.schemas import ChatRequest, CompletionRequest, as_dict
from tuneloop.tasks import extract
from tuneloop.tasks.labels import HeadTrie, LabelTrie

routes = APIRouter()
# Streamed replies are server-sent events; an engine failure is the request's own 500, a
# request not finished within the server's deadline a 504.
GENERATION_RESPONSES = {200: {"content": {"text/event-stream": {}}},
                        500: {"description": "The engine failed on this request"},
                        504: {"description": "Not finished within the server's deadline"}}
REVIEW = "needs_review"  # a classifier's answer when its label is less probable than the threshold


@routes.get("/v1/models")
def list_models(request: Request, who: CallerDep):
    names = request.app.state.router.visible(who)
    return {"object": "list", "data": [_card(name, owner) for name, owner in names]}


@routes.get("/v1/models/{model:path}")
def get_model(model: str, request: Request, who: CallerDep):
    for name, owner in request.app.state.router.visible(who):
        if name == model:
            return _card(name, owner)
    raise _no_model(model)


def _card(name: str, owner: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def _no_model(name: str) -> ApiError:
    # The same answer whether the model does not exist or belongs to another tenant.
    return ApiError(404, f"The model '{name}' does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


@routes.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, who: CallerDep):
    target = await _resolve(request, who, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    if target.task is not None and messages[0]["role"] != "system":
        # The adapter learned its task with this system prompt; clients send only their text.
        module = tasks.module(target.task.kind)
        messages = module.prompt(Example(messages=tuple(messages), answer=""), target.task)
    try:
        prompt = prompt_ids(target.engine.tokenizer, messages)
    except Exception as exc:  # the model's chat template refused the conversation
        raise ApiError(400, f"messages: the model's chat template cannot render them: {exc}",
                       param="messages") from None
    # (a span head answers in its task's shape: no grammar, unless the client asks one)
    grammar = (await _grammar_in_time(request, target, body.response_format)
               if not target.spans or body.response_format else None)
    requested = body.max_completion_tokens or body.max_tokens
    sampling = _sampling(request, target, body, prompt, requested, grammar)
    answers = None
    if target.spans:  # found in the text by the span head (models/spans.py), not decoded
        answers = await run_in_threadpool(_span_answers, target, body, messages, sampling)
    return await _respond(request, who, target, body, prompt, sampling, chat=True,
                          answers=answers)


def _span_answers(target: Target, body, messages: list[dict], sampling: Sampling) -> list:
    """Each choice's (reply, finish reason, reply tokens, confidence) from the target's span
    head: the answer `eval` gives for the same text (tasks/extract.decide), at temperature 0
    the most probable valid tag path, else one drawn at that temperature; held to max_tokens
    and the stop strings as a written reply is, and refused where it does not match the
    client's JSON schema (it cannot be steered toward one). A hybrid extractor's written
    fields are written at the same temperature (the request's seed, or a fresh one, plus the
    choice's index), from the last turns without any system turn of the client's."""
    import torch

    if body.top_p < 1:
        raise ApiError(400, f"top_p: model {body.model} finds its values with a span head, "
                       "which samples from each token's whole tag distribution; leave out top_p",
                       param="top_p", code="unsupported_parameter")
    tokenizer = target.engine.tokenizer
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    out = []
    for i in range(body.n):
        [reply], [confidence], _, _ = extract.spanned_answers(
            target.engine.model, tokenizer, [messages], target.task,
            temperature=sampling.temperature, generator=generator,
            seed=(sampling.seed if sampling.seed is not None else random.randrange(2**31)) + i)
        if sampling.grammar is not None:
            matcher = _grammar_matcher(sampling.grammar)
            if not (matcher.accept_string(reply) and matcher.is_completed()):
                raise ApiError(400, f"response_format: model {body.model} answers with its "
                               f"span head in its task's shape ({extract.schema(target.task)}), "
                               "which this schema does not accept; ask with that schema, "
                               "json_object, or none", param="response_format",
                               code="schema_not_supported")
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        finish = "stop"
        cut = min([reply.find(x) for x in sampling.stop if x in reply], default=-1)
        if cut >= 0:
            reply = reply[:cut]
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if len(ids) > sampling.max_tokens:
            ids, finish = ids[:sampling.max_tokens], "length"
            reply = tokenizer.decode(ids)
        out.append((reply, finish, len(ids), confidence))
    return out


def _grammar_matcher(grammar):
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammar)


@routes.post("/v1/completions", responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, who: CallerDep):
    target = await _resolve(request, who, body.model)
    if target.spans:
        raise ApiError(400, f"model {body.model} finds its values with a span head in a "
                       "conversation's last user turn; call /v1/chat/completions",
                       param="model", code="unsupported_model")
    prompt = target.engine.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    sampling = _sampling(request, target, body, prompt, body.max_tokens, None)
    return await _respond(request, who, target, body, prompt, sampling, chat=False)


async def _resolve(request: Request, who, name: str) -> Target:
    try:  # the first request for a base loads it: not on the event loop
        return await run_in_threadpool(request.app.state.router.resolve, who, name)
    except NotFound:
        raise _no_model(name) from None


def _sampling(request, target: Target, body, prompt: list[int], requested: int | None,
              grammar) -> Sampling:
    """OpenAI's sampling fields, with max_tokens checked against the context and the server cap."""
    context = target.engine.context
    cap = request.app.state.settings.max_tokens_limit
    if requested is not None and requested > cap:
        raise ApiError(400, f"max_tokens is too large: {requested}. This server allows at most "
                       f"{cap} completion tokens.", param="max_tokens", code="invalid_value")
    if len(prompt) + (requested or 1) > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, "
                       f"you requested {len(prompt) + (requested or 1)} tokens ({len(prompt)} in "
                       f"the prompt, {requested or 1} in the completion). Please reduce the "
                       "length of the prompt or completion.",
                       param="messages", code="context_length_exceeded")
    max_tokens = requested or min(cap, context - len(prompt))
    stop = tuple(body.stop or ())
    if isinstance(grammar, LabelTrie):  # a label is answered whole, or it is not a label
        max_tokens, stop = max(max_tokens, max(len(p) for p in grammar.path)), ()
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    seed=body.seed, stop=stop, grammar=grammar)


async def _grammar_in_time(request: Request, target: Target, response_format):
    """`_grammar` within the server's compile deadline: a schema whose compile runs past it is
    refused (400: simplify it); one still waiting for another's compile to end, 503: retry."""
    started = threading.Event()
    limit = request.app.state.settings.grammar_timeout_s
    try:
        return await asyncio.wait_for(run_in_threadpool(_grammar, target, response_format,
                                                        started, limit), limit)
    except (asyncio.TimeoutError, extract.GrammarBusy):
        if started.is_set():
            raise ApiError(400, f"response_format: the JSON schema did not compile within "
                           f"{limit:g} s; make it simpler (fewer optional properties, "
                           "alternatives or enum values)", param="response_format",
                           code="schema_too_complex") from None
        raise ApiError(503, "Another JSON schema is compiling for this model; retry in a few "
                       "seconds", type="server_error", code="compiler_busy",
                       headers={"retry-after": "5"}) from None


def _grammar(target: Target, response_format, started=None, wait_s: float | None = None):
    """The compiled grammar a reply must match: the requested JSON schema or JSON object, or for
    an extraction adapter called without one, an object with exactly its task's fields."""
    kind = response_format.type if response_format else "text"
    if kind == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise ApiError(400, "response_format.json_schema.schema is required for type "
                           "json_schema", param="response_format")
        schema = json.dumps(response_format.json_schema.schema_, sort_keys=True)
    elif kind == "json_object":
        schema = None
    elif target.task is not None and target.task.labels:  # a classifier: its labels
        if target.head is not None:  # its label head decides, the reply is the label
            return _head_trie(target.engine, tuple(target.task.labels), target.head)
        # one of the classifier's labels, always (vLLM: its structured-output `choice`)
        return _label_trie(target.engine, tuple(target.task.labels))
    elif target.task is not None and (
            answer := tasks.module(target.task.kind).answer_schema(target.task)) is not None:
        schema = answer  # the task's own schema (an extractor: an object with its fields)
    else:
        return None
    try:
        return _compile(target.engine, schema, started, wait_s)
    except extract.GrammarBusy:
        raise
    except Exception as exc:
        raise ApiError(400, f"response_format: the JSON schema cannot be used: {exc}",
                       param="response_format") from None


@lru_cache(maxsize=256)
def _label_trie(engine, labels: tuple[str, ...]):
    return LabelTrie(engine.tokenizer, list(labels))


@lru_cache(maxsize=256)
def _head_trie(engine, labels: tuple[str, ...], head: Path):
    from tuneloop.models import head as label_head

    return HeadTrie(engine.tokenizer, list(labels), label_head.read(head))


def _compile(engine, schema: str | None, started=None, wait_s: float | None = None):
    """(Not cached here: the engine's compiler keeps compiled grammars within a bound in bytes;
    a cache by count above it would hold any number of bytes, up to 256 grammars of a client's
    choosing.)"""
    return engine.compile_grammar(schema, started, wait_s)


async def _respond(request: Request, who, target: Target, body, prompt, sampling, *,
                   chat: bool, answers: list | None = None):
    """Run the request on its engine (or give the `answers` a span head found); stream the
    chunks or return them collected. `chat`: the route is /v1/chat/completions (else the
    legacy /v1/completions)."""
    cid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    stream = _Stream(request, who, target, body, prompt, sampling, cid, chat=chat,
                     answers=answers)
    if body.stream:
        return StreamingResponse(stream.sse(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    async for _ in stream.chunks():
        pass
    return stream.collected


class _Stream:
    """One request's chunks, its collected reply, its log row and its metrics."""

    def __init__(self, request, who, target, body, prompt, sampling, cid, *, chat: bool,
                 answers: list | None = None):
        self.app, self.who, self.target, self.body = request.app, who, target, body
        self.answers = answers  # (reply, finish, tokens, confidence) of each choice, if found
        self.prompt, self.sampling, self.id = prompt, sampling, cid
        self.chat = chat  # the route: chat completions, else legacy text completions
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.texts = [""] * body.n
        self.finish: list[str | None] = [None] * body.n
        self.confidence: list[float | None] = [None] * body.n  # a classifier's label probability
        self.review_below = None  # only a classifier's replies (chat requests) are judged
        if isinstance(sampling.grammar, LabelTrie):
            own = body.review_below
            self.review_below = request.app.state.settings.review_below if own is None else own
        self.tokens = 0
        self.collected: dict | None = None

    def _chunk(self, choice: int, text: str | None, finish: str | None, first: bool,
               confidence: float | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            item = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}
            if confidence is not None:  # a classifier's label probability, on its last chunk
                item["confidence"] = confidence
        else:
            item = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._envelope(self.chunk_object, choices=[item])

    def _envelope(self, obj: str, **fields) -> dict:
        """The fields every chunk and reply of this request carries, then `fields`."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                **fields}

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.tokens,
                "total_tokens": len(self.prompt) + self.tokens}

    async def chunks(self):
        """The reply as OpenAI chunks; the collected reply is logged when the last one is out."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = EngineRequest(self.prompt, self.sampling,
                            lambda *e: loop.call_soon_threadsafe(events.put_nowait, e),
                            self.target.adapter, self.target.adapter_path, self.body.n)
        labels = (self.body.model, self.who.tenant)
        started, first_token, status = time.perf_counter(), None, "cancelled"
        if self.answers is None:
            self.target.engine.submit(job)
        else:  # already found (a span head): delivered as the engine's events would be
            for i, (reply, finish, n_tokens, confidence) in enumerate(self.answers):
                events.put_nowait(("text", i, reply))
                events.put_nowait(("done", i, finish, n_tokens, confidence))
        try:
            if self.chat:
                for i in range(self.body.n):
                    yield self._chunk(i, None, None, first=True)
            remaining = self.body.n
            deadline = started + self.app.state.settings.request_timeout_s
            while remaining:
                try:
                    event = await asyncio.wait_for(events.get(),
                                                   max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    status = "error"
                    raise ApiError(504, "The model did not finish this request in "
                                   f"{self.app.state.settings.request_timeout_s:g} s",
                                   type="server_error", code="timeout") from None
                if event[0] == "error":
                    status = "error"
                    raise ApiError(500, event[1], type="server_error", code="engine_error")
                if event[0] == "text":
                    first_token = first_token or time.perf_counter()
                    self.texts[event[1]] += event[2]
                    if self.review_below is None:  # (held back: the label may be replaced)
                        yield self._chunk(event[1], event[2], None, first=False)
                else:
                    choice, reason, n_tokens = event[1:4]
                    confidence = self.confidence[choice] = event[4] if len(event) > 4 else None
                    if self.review_below is not None:
                        if confidence is not None and confidence < self.review_below:
                            self.texts[choice] = REVIEW
                        yield self._chunk(choice, self.texts[choice], None, first=False)
                    self.finish[choice], remaining = reason, remaining - 1
                    self.tokens += n_tokens
                    yield self._chunk(choice, None if self.chat else "", reason,
                                      first=False, confidence=confidence)
            status = "ok"
            latency = time.perf_counter() - started
            self.collected = self._collect()
            await run_in_threadpool(feedback.log_completion_if_able, self.app.state.registry,
                                    self.who, self.target, as_dict(self.body), self.collected,
                                    latency)
            metrics = self.app.state.metrics
            metrics.latency.labels(*labels).observe(latency)
            if first_token:
                metrics.first_token.labels(*labels).observe(first_token - started)
            metrics.prompt_tokens.labels(*labels).inc(len(self.prompt))
            metrics.completion_tokens.labels(*labels).inc(self.tokens)
        finally:
            job.cancelled = status != "ok"  # a client that went away frees its batch rows
            self.app.state.metrics.requests.labels(*labels, status).inc()

    def _collect(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
            for choice, confidence in zip(choices, self.confidence):
                if confidence is not None:  # an extension field: OpenAI's clients keep it
                    choice["confidence"] = confidence
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
            obj = "text_completion"
        return self._envelope(obj, choices=choices, usage=self.usage())

    async def sse(self):
        """Server-sent events: each chunk, the usage chunk if asked, then [DONE]."""
        try:
            async for chunk in self.chunks():
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as exc:  # headers are sent: the error travels as an event
            yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.code))}\n\n"
            return
        options = self.body.stream_options
        if options is not None and options.include_usage:
            usage = self._envelope(self.chunk_object, choices=[], usage=self.usage())
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
