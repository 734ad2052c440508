"""The train step: gradient accumulation equals one big batch; padding and accumulation do not
change the loss normalization; the loss goes down."""

from __future__ import annotations

import jax
import numpy as np

from tests.train.helpers import run_steps, tiny_config


def test_gradient_accumulation_equals_one_batch():
    one, state_one = run_steps(tiny_config("train.grad_accum=1"), 3)
    four, state_four = run_steps(tiny_config("train.grad_accum=4"), 3)
    np.testing.assert_allclose(one, four, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_four.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_loss_decreases_on_a_fixed_batch():
    from tests.train.helpers import make_runner, random_batch
    cfg = tiny_config("train.steps=40")
    state, step, sharding = make_runner(cfg)
    batch = jax.device_put(random_batch(cfg, 0), sharding)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 0.9 * np.log(64)  # starts near uniform over the vocabulary
    assert losses[-1] < 0.5 * losses[0]  # memorizes one batch
