"""OpenAI's HTTP API as ``jaxformer serve`` speaks it: requests parsed and checked, chat
messages rendered with the run's chat template, and the response bodies (whole and streamed).

No HTTP and no threads here (those are ``server`` and ``engine_worker``): bytes and dicts in,
dicts and strings out. A request the server refuses raises ``ApiError``, which carries the HTTP
status and OpenAI's error body. The fields served and their ranges: docs/inference.md
"Serving: an OpenAI-compatible HTTP server".
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxformer.errors import UserError
from jaxformer.inference.processors import SamplingParams
from jaxformer.inference.restore import LoadedRun

DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI
MAX_SEED = 2**31  # seeds in [0, 2**31), as `jaxformer sample --seed`
SSE_DONE = "data: [DONE]\n\n"  # the last event of a stream

# Every field a request may have. Others are refused, as OpenAI refuses them.
COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed",
    "n", "presence_penalty", "frequency_penalty", "user", "logprobs", "logit_bias",
    # Beyond OpenAI's fields (vLLM has the same names): transformers' logits processors.
    "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size"})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                               "response_format", "tools", "tool_choice",
                               "parallel_tool_calls"}
# Fields of OpenAI's API served only at the value that asks for nothing (or ignored: any).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "echo": lambda v: v is None or v is False,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None,
    "logit_bias": lambda v: v is None or v == {},
    "suffix": lambda v: v is None or v == "",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


# -- requests ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """What a request asks of each of its choices."""

    max_tokens: int | None  # None: the default of the endpoint
    sampling: SamplingParams
    stop: list[str]
    seed: int
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request's body -> its JSON object; an ApiError when it is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSON and Unicode decode errors, deep nesting
        raise ApiError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _field(body: dict, name: str, default: Any, kind: type,
           ok: Callable[[Any], bool] = lambda v: True, rule: str = "") -> Any:
    """body[name] checked (null or absent: ``default``); an ApiError naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        typed = isinstance(value, int | float) and not isinstance(value, bool)
        typed = typed and math.isfinite(value)
        what = "a finite number"
    elif kind is int:
        typed = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        typed = isinstance(value, kind)
        what = {bool: "true or false", dict: "an object", str: "a string"}.get(kind, str(kind))
    if not typed:
        raise ApiError(f"{name} must be {what}, got {json.dumps(value)[:100]}", name)
    if not ok(value):
        raise ApiError(f"{name} must be {rule}, got {json.dumps(value)[:100]}", name)
    return float(value) if kind is float else value


def parse_spec(body: dict, allowed: frozenset[str]) -> Spec:
    """The fields every endpoint shares, checked (OpenAI's ranges where it has them);
    ``allowed``: the endpoint's fields (``COMPLETION_FIELDS`` or ``CHAT_FIELDS``)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, disabled in UNSUPPORTED.items():
        if name in body and not disabled(body[name]):
            raise ApiError(f"{name} is not supported by this server", name)
    _field(body, "n", 1, int, lambda v: v == 1, "1 (this server returns one choice per prompt)")
    top_k = _field(body, "top_k", 0, int, lambda v: v >= -1, ">= 0 (0 or -1: disabled)")
    sampling = SamplingParams(
        temperature=_field(body, "temperature", 1.0, float, lambda v: v >= 0, ">= 0"),
        top_k=max(top_k, 0),
        top_p=_field(body, "top_p", 1.0, float, lambda v: 0 < v <= 1, "in (0, 1]"),
        min_p=_field(body, "min_p", 0.0, float, lambda v: 0 <= v < 1, "in [0, 1)"),
        repetition_penalty=_field(body, "repetition_penalty", 1.0, float, lambda v: v > 0,
                                  "> 0"),
        presence_penalty=_field(body, "presence_penalty", 0.0, float, lambda v: -2 <= v <= 2,
                                "in [-2, 2]"),
        frequency_penalty=_field(body, "frequency_penalty", 0.0, float,
                                 lambda v: -2 <= v <= 2, "in [-2, 2]"),
        no_repeat_ngram_size=_field(body, "no_repeat_ngram_size", 0, int, lambda v: v >= 0,
                                    ">= 0"))
    try:
        sampling.check()
    except UserError as e:  # the checks above catch these first
        raise ApiError(str(e)) from e
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("stop must be a non-empty string or a list of them", "stop")
    stream = _field(body, "stream", False, bool)
    options = _field(body, "stream_options", None, dict)
    if options is not None and not stream:
        raise ApiError("stream_options is only allowed when stream is true", "stream_options")
    include_usage = _field(options or {}, "include_usage", False, bool)
    seed = _field(body, "seed", None, int, lambda v: 0 <= v < MAX_SEED, "in [0, 2**31)")
    if seed is None:  # OpenAI's default: a different draw each time
        seed = secrets.randbelow(MAX_SEED)
    max_tokens = _field(body, "max_tokens", None, int, lambda v: v >= 1, ">= 1")
    if "max_completion_tokens" in allowed:
        max_tokens = _field(body, "max_completion_tokens", max_tokens, int, lambda v: v >= 1,
                            ">= 1")
    return Spec(max_tokens, sampling, stops, seed, stream, include_usage)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_prompts(body: dict, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """``prompt`` -> token ids, one list per choice; ``encode`` tokenizes a text prompt (the
    run's, which puts its BOS first when its tokenizer adds one, as ``jaxformer sample``)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("you must provide a prompt", "prompt")
    if isinstance(prompt, str):
        return [encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode(p) for p in prompt]
        if all(_is_id(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError("prompt must be a string, a list of strings, a list of token ids or a "
                   "list of lists of token ids (none empty)", "prompt")


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """``messages`` checked, text parts joined (the template sees string contents)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(f"{where} must be an object with a string role", where)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(f"{where}.content: only text parts are supported",
                               f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string or a list of text parts",
                           f"{where}.content")
        out.append({**m, "content": content})
    return out


# -- chat templates -----------------------------------------------------------------------------


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # As transformers' chat-template ``tojson``: jinja2's own escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTemplate:
    """A Hugging Face chat template rendered as transformers' ``apply_chat_template`` does
    (a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``; ``messages``,
    ``add_generation_prompt=True`` and the special tokens' strings), then tokenized without
    adding special tokens (the template writes them, as transformers assumes)."""

    def __init__(self, source: Any, run: LoadedRun):
        if isinstance(source, list):  # transformers stores named templates as a list
            source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if isinstance(source, dict):
            if "default" not in source:
                raise UserError(f"the run's chat templates are named {sorted(source)}; none is "
                                "'default'")
            source = source["default"]
        if not isinstance(source, str):
            raise UserError(f"the run's chat template is not text: {type(source).__name__}")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"the run's chat template does not parse: {e}") from e
        s = run.specials
        names = {"bos_token": s.bos_id, "eos_token": s.eos_id, "pad_token": s.pad_id}
        self.tokens = {k: run.tokenizer.id_to_token(i) for k, i in names.items()
                       if i is not None}
        self.tokenizer = run.tokenizer

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        **self.tokens)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, mostly
            raise ApiError(f"the chat template refused these messages: {e}", "messages") from e

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = list(self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids)
        if not ids:
            raise ApiError("the chat template rendered these messages as an empty prompt",
                           "messages")
        return ids


# -- responses ----------------------------------------------------------------------------------


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying ``data`` as compact JSON (OpenAI's stream format)."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TextCompletion:
    """The bodies of one ``/v1/completions`` answer (``text_completion``): the whole answer is
    one chunk holding every choice; a stream is one chunk per piece of text."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.include_usage = model, include_usage

    def chunk(self, choices: list[dict], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "choices": choices}
        if usage is not None or self.include_usage:  # streamed with usage: null until the end
            out["usage"] = usage
        return out

    @staticmethod
    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


class ChatCompletion:
    """The bodies of one ``/v1/chat/completions`` answer: the whole ``chat.completion``, or
    its stream of ``chat.completion.chunk``s (each choice's message as deltas)."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.include_usage = model, include_usage

    def body(self, choices: list[dict], usage: dict[str, int]) -> dict[str, Any]:
        """The whole answer; ``choices`` from ``message``."""
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices,
                "usage": usage}

    @staticmethod
    def message(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def chunk(self, choices: list[dict], usage: dict[str, int] | None = None) -> dict[str, Any]:
        """One streamed chunk; ``choices`` from ``delta``."""
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "system_fingerprint": None, "choices": choices}
        if usage is not None or self.include_usage:  # streamed with usage: null until the end
            out["usage"] = usage
        return out

    @staticmethod
    def delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
