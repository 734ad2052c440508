"""Parameter creation with logical axis names.

Every weight carries ``logical_axes`` metadata (``embed``, ``heads``, ``mlp``, ...). The model
never names a mesh axis: ``jaxformer.parallel.sharding`` maps logical names to mesh axes with
the rules table of the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LogicalAxes = tuple[str | None, ...]


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes, std: float,
                 dtype: jnp.dtype) -> nnx.Param:
    """A parameter drawn from N(0, std^2)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def constant_param(shape: tuple[int, ...], axes: LogicalAxes, value: float,
                   dtype: jnp.dtype) -> nnx.Param:
    """A parameter filled with ``value`` (biases: 0, norm scales: 1)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)
