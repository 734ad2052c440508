"""The engine thread of ``jaxformer serve``, and the event loop's side of it.

Threads: uvicorn's event loop parses requests and writes responses; one engine thread
(``EngineWorker``) owns the ``Engine`` (which is not thread-safe) and steps it while any request
runs. Handlers hand it submissions and cancellations through a queue; it hands each step's new
tokens back through ``loop.call_soon_threadsafe``, so a request that arrives while others run
joins their batch at the next step (continuous batching).

In the event loop, a ``Job`` holds one HTTP request's choices (``Choice``) as their tokens come.
Stop strings are matched there on the decoded text (the engine knows only stop token ids); a
choice that matched is cancelled in the engine, which frees its blocks at once. While a choice
streams, text that may still become a stop string, and a character whose bytes have not all
come, are held back for the next token. How this serves: docs/inference.md "Serving: an
OpenAI-compatible HTTP server".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from jaxformer.inference.engine import Engine, Request
from jaxformer.inference.openai_api import ApiError, Spec
from jaxformer.inference.processors import SamplingParams

# uvicorn's server log: the engine thread's failures go with the server's lines.
log = logging.getLogger("uvicorn.error")

# The engine thread's answer for one request: (new tokens, finish reason or None, error or None).
Deliver = Callable[[list[int], str | None, str | None], None]


@dataclasses.dataclass
class Submission:
    """One request for the engine thread, and where its tokens go."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_tokens: tuple[int, ...]
    seed: int
    deliver: Deliver  # called from the engine thread after every step that touched it


class EngineWorker:
    """Owns an ``Engine`` in one thread: runs the commands that came (submit, cancel), steps
    while any request waits or runs, and delivers each step's new tokens; sleeps when idle."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, tuple[Request, Deliver]] = {}  # request id ->
        self._sent: dict[int, int] = {}  # request id -> tokens delivered so far
        self._thread: threading.Thread | None = None
        self._closed = False
        self.peak_batch = 0  # the most requests one step sampled together

    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxformer-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Ends the thread; requests still running end with an error."""
        self._closed = True
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, subs: list[Submission]) -> concurrent.futures.Future:
        """Queues requests, all or none -> a future of their ``Request`` objects (or of the
        UserError that refused one)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            future.set_exception(ApiError("the server is shutting down", status=503,
                                          kind="server_error"))
        else:
            self._commands.put(("submit", subs, future))
        return future

    def cancel(self, req: Request) -> None:
        """Ends ``req`` at the next step boundary (its tokens are no longer delivered)."""
        self._commands.put(("cancel", req))

    def _loop(self) -> None:
        while True:
            try:
                # Idle: sleep until a command comes. Busy: take what has come, then step.
                command = self._commands.get(block=self.engine.idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all("the server is shutting down")
                    return
                try:
                    self._run(command)
                except Exception:  # a bug: keep the thread (and the other requests) alive
                    log.exception("the engine thread failed on a %s command", command[0])
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.idle:
                continue
            try:
                touched = self.engine.step()
            except Exception:  # a bug, or the device failing: end what runs, keep serving
                log.exception("the engine failed; its requests end with an error")
                self._fail_all("the engine failed (see the server log)")
                continue
            self.peak_batch = max(self.peak_batch, len(touched))
            for req in touched:
                self._deliver(req)

    def _run(self, command: tuple) -> None:
        if command[0] == "cancel":
            req = command[1]
            self._live.pop(req.id, None)
            self._sent.pop(req.id, None)
            self.engine.cancel(req)
            return
        _, subs, future = command
        if not future.set_running_or_notify_cancel():
            return  # its client left before the engine thread got to it
        reqs: list[Request] = []
        try:
            for s in subs:
                reqs.append(self.engine.submit(s.prompt, s.max_new_tokens, s.sampling,
                                               s.stop_tokens, s.seed))
        except Exception as e:  # UserError: the handler answers 400
            for req in reqs:
                self.engine.cancel(req)
            future.set_exception(e)
            return
        for req, s in zip(reqs, subs, strict=True):
            self._live[req.id] = (req, s.deliver)
            self._sent[req.id] = 0
        future.set_result(reqs)

    def _deliver(self, req: Request) -> None:
        if req.id not in self._live:
            return  # cancelled
        sent = self._sent[req.id]
        self._live[req.id][1](req.tokens[sent:], req.finish_reason, None)
        self._sent[req.id] = len(req.tokens)
        if req.done:
            del self._live[req.id], self._sent[req.id]

    def _fail_all(self, message: str) -> None:
        for _, deliver in self._live.values():
            deliver([], None, message)
        self._live.clear()
        self._sent.clear()
        for req in [*self.engine.waiting, *(r for r in self.engine.rows if r is not None)]:
            with contextlib.suppress(Exception):  # an engine that failed mid-step
                self.engine.cancel(req)


# -- one HTTP request's generations, in the event loop ----------------------------------------


class Choice:
    """One prompt's generation as its tokens come (in the event loop's thread): its text cut at
    the first stop string, and the part of it safe to stream."""

    def __init__(self, index: int, prompt: list[int], decode: Callable[[list[int]], str],
                 stops: list[str]):
        self.index, self.prompt, self.decode, self.stops = index, prompt, decode, stops
        self.req: Request | None = None
        self.tokens: list[int] = []
        self.text = ""  # streamed so far; the whole text once finished
        self.finish: str | None = None

    def feed(self, tokens: list[int], finish: str | None) -> str:
        """New tokens (and the engine's finish reason) -> the text to stream now; sets
        ``finish`` ("stop" when a stop string matched) once the choice has ended."""
        self.tokens.extend(tokens)
        text = self.decode(self.tokens)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, finish = text[:min(hits)], "stop"
        if finish is None:
            # Hold back a character whose last bytes have not come (it decodes as U+FFFD),
            # and an end that may yet begin a stop string.
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _stop_prefix(text, self.stops)]
        self.finish = finish
        if finish is None and len(text) <= len(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for k in range(longest, 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Job:
    """The choices of one HTTP request, submitted to the engine thread together: one per
    prompt, up to ``max_tokens[i]`` new tokens each, ending at ``stop_tokens`` (the run's end
    tokens) or ``spec.stop``; ``decode`` turns a choice's tokens into its text."""

    def __init__(self, worker: EngineWorker, decode: Callable[[list[int]], str],
                 stop_tokens: tuple[int, ...], prompts: list[list[int]], max_tokens: list[int],
                 spec: Spec):
        self.worker, self.stop_tokens = worker, stop_tokens
        self.spec, self.max_tokens = spec, max_tokens
        self.choices = [Choice(i, p, decode, spec.stop) for i, p in enumerate(prompts)]
        self._events: asyncio.Queue | None = None

    async def start(self) -> None:
        """Submits every choice; a UserError (the engine's checks) refuses them all."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self._events = events

        def deliver(index: int, tokens: list[int], finish: str | None,
                    error: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, (index, tokens, finish, error))

        subs = [Submission(c.prompt, n, self.spec.sampling, self.stop_tokens, self.spec.seed,
                           lambda t, f, e, i=c.index: deliver(i, t, f, e))
                for c, n in zip(self.choices, self.max_tokens, strict=True)]
        reqs = await asyncio.wrap_future(self.worker.submit(subs))
        for c, req in zip(self.choices, reqs, strict=True):
            c.req = req

    async def events(self) -> AsyncIterator[tuple[Choice, str]]:
        """-> (choice, text to stream) as tokens come; the last of a choice has its
        ``finish`` set. Unfinished choices are cancelled when the caller stops listening."""
        assert self._events is not None, "start() first"
        left = len(self.choices)
        try:
            while left:
                index, tokens, finish, error = await self._events.get()
                if error is not None:
                    raise ApiError(error, status=500, kind="server_error")
                choice = self.choices[index]
                if choice.finish is not None:
                    continue  # tokens that came after a stop string
                delta = choice.feed(tokens, finish)
                if choice.finish is not None:
                    left -= 1
                    if finish is None:  # a stop string: the engine would go on
                        self.worker.cancel(choice.req)
                if delta or choice.finish is not None:
                    yield choice, delta
        finally:
            for c in self.choices:
                if c.req is not None and c.finish is None:
                    self.worker.cancel(c.req)

    async def run(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.prompt) for c in self.choices)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}
