"""The FastAPI application: settings, errors in OpenAI's shape, authentication, limits, metrics.

Routes live by resource: api.py (models, chat and text completions), feedback.py, files.py and
jobs.py (fine-tuning as a service), console_api.py and datasets_api.py (what the console's
pages read, and preparing an uploaded file into a dataset version); they import the caller
(auth.py) and the error (errors.py), never this module. Every error a client can cause is an
`ApiError` rendered as {"error": {"message", "type", "param", "code"}} with the status OpenAI
uses for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError

from tuneloop.serve.auth import RateLimiter, bearer, caller
from tuneloop.serve.errors import ApiError, error_body
from tuneloop.serve.metrics import Metrics, OneTenant
from tuneloop.serve.router import Router
from tuneloop.store import Registry, unavailable

log = logging.getLogger("tuneloop.serve")


@dataclass
class Settings:
    """How the server runs; `tuneloop serve` flags map onto these one to one."""

    workspace: Path
    bases: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])
    auth: bool = True  # False: every request is tenant "default" (a single-user machine)
    max_body_bytes: int = 1 * 2**20  # inference and feedback requests
    max_upload_bytes: int = 512 * 2**20  # /v1/files
    max_tokens_limit: int = 4096  # no single reply is longer than this
    # A classifier's reply whose label probability is below this answers REVIEW instead (a
    # request may set its own with "review_below"); None: always the label.
    review_below: float | None = None
    # The last guard: a request the engine has not finished by then is answered with an error
    # (and its rows freed) instead of waiting for ever.
    request_timeout_s: float = 600.0
    # A response_format schema that has not compiled by then is refused (400: simplify it); the
    # compile goes on in the background, one at a time per model (tasks/extract.GrammarCache).
    grammar_timeout_s: float = 10.0
    # A bearer token with which /metrics shows every tenant's series (for Prometheus'
    # `authorization` scrape setting); a tenant's key shows only its own.
    metrics_token: str | None = None
    log_retention_days: int = 30  # request log rows without feedback are deleted after this
    max_batch: int = 32
    adapter_budget_mb: int = 512
    worker: bool = True  # run queued fine-tuning jobs in a worker process
    engine: str = "builtin"  # the bases' engine by name (serve/router.py ENGINES): or "vllm"
    vllm_python: str | None = None  # the Python of vLLM's own environment
    vllm_args: list[str] = field(default_factory=list)  # more arguments for vLLM's server


def create_app(settings: Settings) -> FastAPI:
    """The application; engines load on first use, the job worker starts with the app."""
    registry = Registry.open(settings.workspace)
    router = Router(registry, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from tuneloop.serve import feedback, jobs

        feedback.apply_retention(registry, settings.log_retention_days)
        if router.kind.warm:  # an engine that takes a while to start: before the first request
            await asyncio.gather(*(asyncio.to_thread(router.engine, b) for b in settings.bases))
        supervisor = None
        if settings.worker:
            app.state.worker = jobs.start_worker(settings.workspace)
            supervisor = asyncio.create_task(_supervise(app, settings))
        yield
        if supervisor is not None:
            supervisor.cancel()
            jobs.stop_worker(app.state.worker)
        router.close()

    app = FastAPI(title="tuneloop", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings, app.state.registry, app.state.router = settings, registry, router
    app.state.limiter, app.state.metrics = RateLimiter(registry), Metrics(router)
    _install_error_handlers(app)
    _document_errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)

    from tuneloop.serve import api, console, console_api, datasets_api, feedback, files, jobs

    for module in (api, feedback, files, jobs, console_api, datasets_api, console):
        app.include_router(module.routes)

    @app.get("/health")
    def health():
        return {"status": "ok", "engines": {k: e.status() for k, e in router.engines.items()}}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={401: {"description": "No API key and no metrics token"}})
    def metrics(request: Request):
        """Prometheus text. The operator's `metrics_token` (or a server without keys) reads
        every tenant's series; a tenant's key reads its own, and no key reads nothing."""
        tenant = _metrics_scope(request)
        source = app.state.metrics.registry
        return PlainTextResponse(generate_latest(source if tenant is None
                                                 else OneTenant(source, tenant)),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


async def _supervise(app: FastAPI, settings: Settings, every_s: float = 2.0) -> None:
    """Restart the job worker if it dies; the new one takes over its job (and resumes it)."""
    from tuneloop.serve import jobs

    while True:
        await asyncio.sleep(every_s)
        code = app.state.worker.poll()  # also reaps it, so it is not left a zombie
        if code is not None:
            log.warning("job worker exited with status %s; starting another", code)
            app.state.worker = jobs.start_worker(settings.workspace)


def _metrics_scope(request: Request) -> str | None:
    """None (every tenant) for the operator's token or a server without keys, else the
    caller's tenant (401 without a valid key)."""
    settings: Settings = request.app.state.settings
    if not settings.auth or (settings.metrics_token and hmac.compare_digest(
            bearer(request).encode(), settings.metrics_token.encode())):
        return None
    return caller(request).tenant


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def registry_error(request: Request, exc: DBAPIError):
        """The registry's database restarting or down: 503 with a time to retry, at once (the
        pool tests each connection before use, so requests succeed again once it is back)."""
        if unavailable(exc):
            log.warning("%s %s: the registry cannot be reached: %s", request.method,
                        request.url.path, exc.orig)
            return JSONResponse(error_body(
                "The registry's database cannot be reached (restarting or down); retry in a "
                "few seconds", "server_error", "registry_unavailable"), 503,
                headers={"retry-after": str(REGISTRY_RETRY_S)})
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("The server failed to answer this request; its log "
                                       "says why", "server_error", "internal_error"), 500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"The body is not valid JSON: {first.get('msg')} (at character {where[-1] if where else '?'})"
            return JSONResponse(error_body(message, "invalid_request_error", "invalid_json"), 400)
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_value", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """The framework's own refusals (no such route, method not allowed, a body its parser
        cannot read) in the same shape as every other error."""
        if exc.status_code == 404:
            message, code = f"Unknown route {request.method} {request.url.path}", "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        elif exc.status_code == 400:  # the body parser's
            message, code = f"{exc.detail} (send a JSON object, UTF-8 encoded)", "invalid_body"
        else:
            message, code = str(exc.detail), None
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return JSONResponse(error_body(message, kind, code), exc.status_code,
                            headers=getattr(exc, "headers", None))


ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
# What any /v1 route can answer besides its own errors (declared on the route)
COMMON_ERRORS = {"400": "A field is missing or out of range: the message and `param` name it",
                 "401": "No API key, or one this server does not know",
                 "404": "No such object for this tenant", "413": "The body is over the limit",
                 "429": "Over this key's requests per minute; see `retry-after`",
                 "503": "The registry's database cannot be reached; see `retry-after`"}
REGISTRY_RETRY_S = 2


def _document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API answers: errors in OpenAI's shape with the
    statuses it uses (400 for a bad field where FastAPI's own document says 422), so that a
    client generated from it, and the schema-driven fuzzing in the tests, hold it to that."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
            error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    responses = operation["responses"]
                    responses.pop("422", None)
                    if path.startswith("/v1/"):
                        for code, why in COMMON_ERRORS.items():
                            responses.setdefault(code, {"description": why})
                    for code, response in responses.items():
                        if code >= "400":
                            response["content"] = error
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


MAX_HEADER_BYTES = 32 * 1024  # nginx's default large_client_header_buffers is 4 x 8 KB
# What the HTTP parser may buffer while a request's head is still arriving. h11's own default
# (16 KB) sits below MAX_HEADER_BYTES: a head of 16-32 KB, or one over the limit that arrived in
# pieces, was cut off with a bare 400 and a reset connection before BodyLimit could answer 431,
# depending on how the network split it. Above this size the parser still refuses (memory guard).
HEAD_READ_LIMIT = 256 * 1024


def _uvicorn_options(graceful_s: int) -> dict:
    return {"h11_max_incomplete_event_size": HEAD_READ_LIMIT,
            "timeout_graceful_shutdown": graceful_s}


class BodyLimit:
    """Refuse request bodies over the limit (413) before they are read into memory, whether
    the client declares a Content-Length or streams the body in chunks.

    A declared length is checked before anything is read (the server holds the client to it).
    A chunked request body is read here first, up to the limit (1 MiB by default), and handed
    on whole: refused from inside the application's own read, the error would reach the client
    as FastAPI's 400 "error parsing the body" instead of the 413 it is. A chunked upload is
    counted as it streams instead (held whole it would cost its size in memory).
    """

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return await _refuse(send, 431, "request_headers_too_large",
                                 f"Request headers are larger than {MAX_HEADER_BYTES} bytes")
        limit = self.upload_limit if scope["path"].startswith("/v1/files") else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await _too_large(send, limit)
            return await self.app(scope, receive, send)
        if limit > self.limit:  # an upload is not held in memory: counted as it streams
            try:
                return await self.app(scope, _counted(receive, limit), send)
            except _TooLarge:  # (where the application's parser lets it through)
                return await _too_large(send, limit)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > limit:
                return await _too_large(send, limit)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        if messages[-1]["type"] != "http.request":  # e.g. the client left: pass that on
            replay = [messages[-1]]

        async def buffered():
            return replay.pop(0) if replay else await receive()

        await self.app(scope, buffered, send)


class _TooLarge(Exception):
    pass


def _counted(receive, limit: int):
    """`receive` that stops the read past `limit` bytes."""
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _TooLarge()
        return message

    return counted


async def _too_large(send, limit: int) -> None:
    await _refuse(send, 413, "request_too_large",
                  f"Request body is larger than this server's limit of {limit} bytes")


async def _refuse(send, status: int, code: str, message: str) -> None:
    response = JSONResponse(error_body(message, "invalid_request_error", code), status)
    await response({"type": "http"}, None, send)


@contextlib.contextmanager
def running(settings: Settings, host: str = "127.0.0.1"):
    """The server in a background thread on a free loopback port; yields its base URL. For
    tests, benchmarks and the demo: the same application `tuneloop serve` runs."""
    import socket
    import threading
    import urllib.request

    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning",
                                           **_uvicorn_options(graceful_s=2)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 900  # engines started with the app (vLLM) take a while
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the server did not start; its log says why") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted."""
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                **_uvicorn_options(graceful_s=5))


