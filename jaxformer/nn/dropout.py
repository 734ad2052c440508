"""Inverted dropout as a pure function of an explicit key (no module state, so the train step
stays a pure function of (params, batch, key))."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jnp.ndarray, rate: float, rng: jax.Array | None) -> jnp.ndarray:
    """Zeroes each element with probability ``rate`` and scales the rest by 1 / (1 - rate), so
    the expectation is unchanged. The identity when ``rng`` is None (evaluation) or rate is 0.
    x: any shape -> same shape and dtype."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
