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


def test_dropout_changes_the_step_and_depends_only_on_seed_and_step():
    plain, _ = run_steps(tiny_config(), 2)
    dropped, _ = run_steps(tiny_config("model.dropout=0.3"), 2)
    again, _ = run_steps(tiny_config("model.dropout=0.3"), 2)
    other_seed, _ = run_steps(tiny_config("model.dropout=0.3", "train.seed=1"), 2)
    assert dropped == again  # same (seed, step): the same units dropped
    assert abs(dropped[0] - plain[0]) > 1e-4  # the same init, but units were dropped
    assert dropped[0] != other_seed[0]
