"""The one loss: weighted token cross-entropy, normalized by the number of real targets.

Returning sums (not means) lets gradient accumulation and data-parallel reductions add
micro-batches exactly and divide once by the total target count.
Letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray,
                       weights: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """logits: [B, T, V] float32, targets: [B, T] int, weights: [B, T] float.

    -> {"loss_sum", "weight_sum", "correct_sum"} float32 scalars.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses * weights),
        "weight_sum": jnp.sum(weights),
        "correct_sum": jnp.sum(correct * weights),
    }
