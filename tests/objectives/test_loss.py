from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxformer.objectives.loss import cross_entropy_sums


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    out = cross_entropy_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                             jnp.asarray(weights))
    np.testing.assert_allclose(float(out["loss_sum"]), (nll * weights).sum(), rtol=1e-5)
    assert float(out["weight_sum"]) == 7
    correct = (logits.argmax(-1) == targets) * weights
    assert float(out["correct_sum"]) == correct.sum()
