"""``jaxformer serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints (JSON in and out, with the fields and shapes of OpenAI's API):

- ``POST /v1/completions``: ``prompt`` (a string; a list of strings, one choice each; a list
  of token ids; or a list of such lists) -> a ``text_completion``.
- ``POST /v1/chat/completions``: ``messages`` rendered with the run's chat template (a run
  converted from a Hugging Face model that came with one) -> a ``chat.completion``.
- ``GET /v1/models``: the one model, named after the run dir.

With ``"stream": true`` the answer is server-sent events as OpenAI sends them: one
``data: {chunk}`` event per piece of text, then ``data: [DONE]``.

This module is the HTTP side: the Starlette app, its handlers (``Service``), loading a run and
``serve``. The protocol (request fields, chat templates, response bodies) is ``openai_api``; the
thread that owns the engine, and the event loop's side of it (stop strings, streaming), is
``engine_worker``. Errors a client causes (malformed JSON, an unknown field, a value out of
range, a prompt past the context, chat without a chat template) are HTTP 400 with OpenAI's
error body and one line in the log; the server goes on serving the other requests. The
command and what it serves: docs/inference.md "Serving: an OpenAI-compatible HTTP server".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.inference.engine import Engine
from jaxformer.inference.engine_worker import EngineWorker, Job
from jaxformer.inference.openai_api import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    DEFAULT_MAX_TOKENS,
    SSE_DONE,
    ApiError,
    ChatCompletion,
    ChatTemplate,
    Spec,
    TextCompletion,
    parse_body,
    parse_messages,
    parse_prompts,
    parse_spec,
    sse,
)
from jaxformer.inference.restore import LoadedRun, load_for_generation
from jaxformer.runs.restore import read_run_config
from jaxformer.runs.specials import read_chat_template

# uvicorn's server log: the server's own lines (one per request) go with uvicorn's.
log = logging.getLogger("uvicorn.error")


class Service:
    """A loaded run, its engine and engine thread, and the HTTP handlers."""

    def __init__(self, run: LoadedRun, name: str, *, chat_template: Any = None,
                 max_batch: int = 8, block_size: int = 16, num_blocks: int | None = None):
        self.run, self.name = run, name
        self.engine = Engine(run.family, run.params, max_batch=max_batch,
                             block_size=block_size, num_blocks=num_blocks)
        self.worker = EngineWorker(self.engine)
        self.chat_template = None if chat_template is None else ChatTemplate(chat_template, run)
        self.created = int(time.time())

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.close()

    def warm_up(self) -> None:
        """Compiles the prefill, decode and greedy sampling calls with one tiny request (before
        the engine thread starts), so the first client does not wait for them."""
        start = self.run.specials.bos_id if self.run.specials.bos_id is not None else 0
        # Two tokens: a prefill, then one batched decode. Twice: the first prefill reads the
        # pool as init_pool made it, later ones the pool a call returned, and jit compiles the
        # two apart.
        for _ in range(2):
            self.engine.submit([start], 2)
            self.engine.run()

    def _job(self, prompts: list[list[int]], max_tokens: list[int], spec: Spec) -> Job:
        """One request's choices for the engine thread; each also ends at the run's end
        tokens."""
        return Job(self.worker, self.run.decode, tuple(self.run.specials.eos_ids), prompts,
                   max_tokens, spec)

    # -- handlers ----------------------------------------------------------------------------

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created,
             "owned_by": "jaxformer"}]})

    async def completions(self, request: HttpRequest) -> Response:
        began = time.perf_counter()
        try:
            body = parse_body(await request.body())
            spec = parse_spec(body, COMPLETION_FIELDS)
            prompts = parse_prompts(body, self.run.encode)
            n = spec.max_tokens or DEFAULT_MAX_TOKENS
            job = self._job(prompts, [n] * len(prompts), spec)
            await job.start()
        except (ApiError, UserError) as e:
            return _error(request, e)
        reply = TextCompletion(self.name, spec.include_usage)

        async def pieces() -> AsyncIterator[str]:
            async for c, delta in job.events():
                yield sse(reply.chunk([reply.choice(c.index, delta, c.finish)]))

        return await _respond(request, job, began, spec, reply, lambda: reply.chunk(
            [reply.choice(c.index, c.text, c.finish) for c in job.choices], job.usage()), pieces)

    async def chat_completions(self, request: HttpRequest) -> Response:
        began = time.perf_counter()
        try:
            body = parse_body(await request.body())
            spec = parse_spec(body, CHAT_FIELDS)
            messages = parse_messages(body)
            if self.chat_template is None:
                raise ApiError(f"the model {self.name} has no chat template: use "
                               "/v1/completions", "messages")
            prompt = self.chat_template.encode(messages)
            n = spec.max_tokens
            if n is None:  # as OpenAI: up to the end of the context
                n = self.engine.max_len - len(prompt)
                if n < 1:
                    raise ApiError(f"the messages ({len(prompt)} tokens) fill the model's "
                                   f"context ({self.engine.max_len} tokens)", "messages")
            job = self._job([prompt], [n], spec)
            await job.start()
        except (ApiError, UserError) as e:
            return _error(request, e)
        reply = ChatCompletion(self.name, spec.include_usage)

        async def pieces() -> AsyncIterator[str]:
            for c in job.choices:
                yield sse(reply.chunk([reply.delta(c.index, {"role": "assistant", "content": ""})]))
            async for c, text in job.events():
                if text:
                    yield sse(reply.chunk([reply.delta(c.index, {"content": text})]))
                if c.finish is not None:
                    yield sse(reply.chunk([reply.delta(c.index, {}, c.finish)]))

        return await _respond(request, job, began, spec, reply, lambda: reply.body(
            [reply.message(c.index, c.text, c.finish) for c in job.choices], job.usage()), pieces)


async def _respond(request: HttpRequest, job: Job, began: float, spec: Spec,
                   reply: TextCompletion | ChatCompletion, whole: Callable[[], dict],
                   pieces: Callable[[], AsyncIterator[str]]) -> Response:
    """The answer to a started job, either endpoint: ``whole()`` once it has finished, or
    (streaming) its ``pieces()`` as server-sent events, the usage chunk when asked for, then
    [DONE]. An error once streaming has begun is the stream's last event."""
    if not spec.stream:
        try:
            await job.run()
        except ApiError as e:
            return _error(request, e)
        _done(request, job, began)
        return JSONResponse(whole())

    async def events() -> AsyncIterator[str]:
        try:
            async for piece in pieces():
                yield piece
            if spec.include_usage:
                yield sse(reply.chunk([], job.usage()))
            yield SSE_DONE
            _done(request, job, began)
        except ApiError as e:
            _log_error(request, e)
            yield sse(e.body())

    return _stream(events())


def _log_error(request: HttpRequest, e: ApiError) -> None:
    log.warning("%s %s %d: %s", request.method, request.url.path, e.status, e.message)


def _error(request: HttpRequest, e: ApiError | UserError) -> JSONResponse:
    """One log line and OpenAI's error body (a UserError is the engine's 400)."""
    if not isinstance(e, ApiError):
        e = ApiError(str(e))
    _log_error(request, e)
    return JSONResponse(e.body(), status_code=e.status)


def _done(request: HttpRequest, job: Job, began: float) -> None:
    u = job.usage()
    log.info("%s %s 200: %d choice(s), %d prompt + %d completion tokens, %.2f s",
             request.method, request.url.path, len(job.choices), u["prompt_tokens"],
             u["completion_tokens"], time.perf_counter() - began)


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    # Unknown paths and methods: OpenAI's error body too.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    e = ApiError(f"{exc.detail if isinstance(exc, HTTPException) else 'error'} "
                 f"({request.method} {request.url.path})", status=status)
    return _error(request, e)


def create_app(service: Service) -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()

    routes = [Route("/v1/completions", service.completions, methods=["POST"]),
              Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error})


def check_servable(cfg: Config, run_dir: Path) -> None:
    """A UserError unless the run is a causal decoder-only model (what the engine serves)."""
    arch, objective = cfg.model.arch, cfg.objective.kind
    if arch != "decoder" or objective == "prefix_lm":
        what = f"a prefix-LM (objective.kind={objective!r})" if arch == "decoder" else \
            f"model.arch={arch!r}"
        raise UserError(f"{run_dir} holds {what}: serve runs causal decoder-only models "
                        "(`jaxformer sample` generates from the others)")


def load_service(run_dir: Path, *, step: int | None = None, max_batch: int = 8,
                 block_size: int = 16) -> Service:
    """Loads a run dir to serve; a UserError (before anything listens) when it is not a
    causal decoder-only model, or its chat template does not parse."""
    run_dir = Path(run_dir)
    check_servable(read_run_config(run_dir), run_dir)
    run = load_for_generation(run_dir, step)
    return Service(run, run_dir.resolve().name, chat_template=read_chat_template(run_dir),
                   max_batch=max_batch, block_size=block_size)


def _check_port(host: str, port: int) -> None:
    """A UserError now, before the model loads, when ``host:port`` cannot be listened on."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in [1, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, *,
          step: int | None = None, max_batch: int = 8, block_size: int = 16,
          log_level: str = "info") -> None:
    """``jaxformer serve``: loads the run, compiles, and serves until Ctrl-C (then returns:
    requests in flight are answered first, as uvicorn shuts down)."""
    if max_batch < 1 or block_size < 1:
        raise UserError(f"--max-batch and --block-size must be at least 1, got {max_batch} and "
                        f"{block_size}")
    _check_port(host, port)
    service = load_service(run_dir, step=step, max_batch=max_batch, block_size=block_size)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            access_log=False)  # the server logs one line per request itself
    log.info("compiling %s (context %d tokens, %d rows of %d-token blocks)", service.name,
             service.engine.max_len, max_batch, block_size)
    service.warm_up()
    chat = "/v1/chat/completions, " if service.chat_template is not None else ""
    log.info("serving %s at http://%s:%d/v1 (/v1/completions, %s/v1/models)", service.name,
             host, port, chat)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down cleanly
        log.info("stopped")
