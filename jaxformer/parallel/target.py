"""The platform a program is traced for: the default backend, or the one being compiled for.

Modules that pick an implementation per platform (the attention kernel, the tied un-embedding,
MoE's dropless path) ask ``target_platform()`` rather than ``jax.default_backend()``, so that
``jaxformer compile`` on a CPU machine traces the train step a TPU would run (the splash
kernel, not the CPU one) inside ``compiling_for("tpu")``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxformer_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform set by ``compiling_for``, else the default
    backend's."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """While tracing inside this context, ``target_platform()`` is ``platform``."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
