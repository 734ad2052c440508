"""The platform a program is traced for: the default backend, or the one being compiled for.

Modules that pick an implementation per platform (the attention kernel, the tied un-embedding,
MoE's dropless path) ask ``target_platform()`` rather than ``jax.default_backend()``, so that
``jaxformer compile`` on a CPU machine traces the train step a TPU would run (the splash
kernel, not the CPU one) inside ``compiling_for("tpu")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
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


def use_present_platforms() -> None:
    """With libtpu installed (``jaxformer compile`` needs it) on a machine without a TPU, JAX
    would try to start the TPU runtime before the first program and print its failure (a
    screenful of libtpu warnings). Unless $JAX_PLATFORMS says otherwise, use the platforms
    this machine has. Called when ``jaxformer`` is imported, before JAX starts a backend."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    from jax._src import hardware_utils  # reads the PCI bus; starts no backend

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        cuda = any(importlib.util.find_spec(name) is not None for name in
                   ("jax_cuda12_plugin", "jax_cuda13_plugin"))
        platforms = "cuda,cpu" if cuda else "cpu"
        os.environ["JAX_PLATFORMS"] = platforms  # for the processes this one starts
        jax.config.update("jax_platforms", platforms)
