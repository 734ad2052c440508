"""The one loss: weighted token cross-entropy, normalized by the number of real targets, with
optional label smoothing and z-loss.

Returning sums (not means) lets gradient accumulation and data-parallel reductions add
micro-batches exactly and divide once by the total target count.
Letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *,
                       label_smoothing: float = 0.0,
                       z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """logits: [B, T, V] float32, targets: [B, T] int, weights: [B, T] float.

    Per token, with ``log Z = logsumexp(logits)`` and ``eps = label_smoothing``:

    - nll = log Z - logits[target] (the plain negative log-likelihood);
    - smoothed cross-entropy (Szegedy et al. 2016; Vaswani et al. 2017) against the target
      distribution ``(1 - eps) * onehot + eps / V``, i.e. what ``optax.smooth_labels`` then
      ``optax.softmax_cross_entropy`` give, computed without the [B, T, V] one-hot as
      ``(1 - eps) * nll + eps * (log Z - mean_v logits)``;
    - z term (PaLM, Chowdhery et al. 2022): ``z_loss * (log Z)^2``.

    -> float32 scalars, each a ``weights``-weighted sum over tokens:
    ``"loss_sum"`` the objective to differentiate (smoothed cross-entropy + z term; the plain
    nll when both options are 0), ``"nll_sum"`` the unsmoothed nll without z term (for
    perplexity), ``"z_loss_sum"`` the z terms alone (0 when ``z_loss == 0``), ``"weight_sum"``,
    and ``"correct_sum"`` (argmax hits).
    """
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if isinstance(z_loss, (int, float)) and z_loss < 0:
        raise ValueError(f"z_loss={z_loss} must be >= 0")
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    loss = nll
    z_loss_sum = jnp.zeros((), jnp.float32)
    if label_smoothing or z_loss:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        if label_smoothing:
            uniform = log_z - jnp.mean(logits, axis=-1)  # cross-entropy against 1/V everywhere
            loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
        if z_loss:
            z_terms = z_loss * jnp.square(log_z)
            loss = loss + z_terms
            z_loss_sum = jnp.sum(z_terms * weights)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "nll_sum": jnp.sum(nll * weights),
        "z_loss_sum": z_loss_sum,
        "weight_sum": jnp.sum(weights),
        "correct_sum": jnp.sum(correct * weights),
    }
