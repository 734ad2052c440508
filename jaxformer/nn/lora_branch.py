"""LoRA's side branch (Hu et al. 2021, eq. 3 with the reference code's ``lora_dropout``):
``h = x W0 + s * (drop(x) A) B`` beside a frozen kernel ``W0``.

jaxformer normally merges ``W0 + s A B`` before the model call (``models.lora.merge``), which
no layer needs to know about. Dropout on the adapter's input cannot be merged into a weight
(the mask differs per token and feature), so a train step with ``lora.dropout > 0`` attaches
each adapter pair to the module that owns its kernel, as a ``LoraBranch`` variable named
``lora_<kernel>``, and the module adds the branch where it multiplies by the kernel
(``branch_output``). Modules that do so say ``LORA_BRANCH = True``; the config check refuses
``lora.dropout`` on kernels of any other module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.dropout import dropout


class LoraBranch(nnx.Variable):
    """One kernel's adapters and dropout key: value ``{"a": A [I, r], "b": B [r, O], "key":
    a PRNG key}`` (a leading ``layers`` axis on each in a scanned stack); metadata ``scale``
    (alpha / r) and ``rate`` (the dropout rate)."""


def attach(module: nnx.Module, kernel: str, a: jax.Array, b: jax.Array, key: jax.Array,
           scale: float, rate: float) -> None:
    """Gives ``module`` the branch of its kernel ``kernel`` (e.g. ``"w_q"``)."""
    if not getattr(type(module), "LORA_BRANCH", False):
        raise ValueError(f"{type(module).__name__} does not run LoRA branches ({kernel})")
    setattr(module, "lora_" + kernel,
            LoraBranch({"a": a, "b": b, "key": key}, scale=scale, rate=rate))


def branch_output(module: nnx.Module, kernel: str, x: jnp.ndarray) -> jnp.ndarray | None:
    """x: [M, I] (the kernel's flattened input) -> ``s * (drop(x) A) B`` [M, O] in x's dtype,
    or None when ``module`` has no branch for ``kernel``."""
    var = getattr(module, "lora_" + kernel, None)
    if var is None:
        return None
    v: dict[str, Any] = var.get_value()
    dropped = dropout(x, var.rate, v["key"])
    return (var.scale * ((dropped @ v["a"].astype(x.dtype)) @ v["b"].astype(x.dtype))
            ).astype(x.dtype)
