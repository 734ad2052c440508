"""Label smoothing and z-loss in cross_entropy_sums, against naive numpy math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxformer.objectives.loss import cross_entropy_sums

V = 13


def example(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(2, 6, V)) * 3 + 2).astype(np.float32)  # offset: log Z far from 0
    targets = rng.integers(0, V, (2, 6))
    # padding (0) and a fractional weight
    weights = np.array([[1, 1, 1, 1, 0, 0], [1, 0.5, 1, 1, 1, 0]], np.float32)
    return logits, targets, weights


def naive(logits, targets, weights, eps, z):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    logp = logits - log_z[..., None]
    onehot = np.eye(V)[targets]
    smoothed = (1 - eps) * onehot + eps / V
    ce = -(smoothed * logp).sum(-1)
    nll = -(onehot * logp).sum(-1)
    zterm = z * log_z ** 2
    return {"loss_sum": ((ce + zterm) * weights).sum(), "nll_sum": (nll * weights).sum(),
            "z_loss_sum": (zterm * weights).sum()}


def run(logits, targets, weights, **kw):
    out = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             **kw)
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("eps,z", [(0.1, 0.0), (0.0, 1e-4), (0.1, 1e-4), (0.3, 0.01),
                                   (1.0, 0.0)])
def test_options_match_naive_numpy(eps, z):
    logits, targets, weights = example()
    got = run(logits, targets, weights, label_smoothing=eps, z_loss=z)
    want = naive(logits, targets, weights, eps, z)
    for key in ("loss_sum", "nll_sum", "z_loss_sum"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert got["weight_sum"] == weights.sum()
    assert got["correct_sum"] == ((logits.argmax(-1) == targets) * weights).sum()


def test_smoothing_equals_optax_smooth_labels():
    logits, targets, weights = example(1)
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets, V), 0.1)
    per_token = optax.softmax_cross_entropy(jnp.asarray(logits), smoothed)
    got = run(logits, targets, weights, label_smoothing=0.1)
    np.testing.assert_allclose(got["loss_sum"], float(jnp.sum(per_token * weights)), rtol=1e-5)


def test_defaults_equal_the_plain_loss():
    logits, targets, weights = example(2)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    default = run(logits, targets, weights)
    explicit = run(logits, targets, weights, label_smoothing=0.0, z_loss=0.0)
    assert default == explicit
    np.testing.assert_allclose(default["loss_sum"], (nll * weights).sum(), rtol=1e-5)
    assert default["loss_sum"] == default["nll_sum"]
    assert default["z_loss_sum"] == 0.0
    plain = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                            jnp.asarray(targets))
    assert default["loss_sum"] == float(jnp.sum(plain * weights))  # bit-identical to before


def test_nll_sum_unaffected_by_options():
    logits, targets, weights = example(3)
    base = run(logits, targets, weights)["nll_sum"]
    for eps, z in [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)]:
        out = run(logits, targets, weights, label_smoothing=eps, z_loss=z)
        assert out["nll_sum"] == pytest.approx(base, rel=1e-6)
        assert out["loss_sum"] != pytest.approx(base, rel=1e-6)


def test_padding_tokens_contribute_nothing():
    logits, targets, weights = example(4)
    changed = logits.copy()
    changed[weights == 0] = 100.0 * np.arange(V)  # huge log Z on padded tokens only
    a = run(logits, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    b = run(changed, targets, weights, label_smoothing=0.1, z_loss=1e-3)
    for key in ("loss_sum", "nll_sum", "z_loss_sum", "weight_sum"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)


def test_z_loss_gradient_pulls_log_z_to_zero():
    logits, targets, weights = example(5)

    def total(lg, z):
        return cross_entropy_sums(lg, jnp.asarray(targets), jnp.asarray(weights),
                                  z_loss=z)["loss_sum"]

    g0 = jax.grad(total)(jnp.asarray(logits), 0.0)
    g1 = jax.grad(total)(jnp.asarray(logits), 1e-2)
    log_z = jax.nn.logsumexp(jnp.asarray(logits), axis=-1)
    # d/dlogits of z * logZ^2 = 2 z logZ softmax(logits), per weighted token
    want = 2e-2 * (weights * log_z)[..., None] * jax.nn.softmax(jnp.asarray(logits), -1)
    np.testing.assert_allclose(np.asarray(g1 - g0), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_bad_options_raise():
    logits, targets, weights = example()
    with pytest.raises(ValueError, match="label_smoothing"):
        run(logits, targets, weights, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="z_loss"):
        run(logits, targets, weights, z_loss=-1.0)


@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_gradient_matches_naive_numpy(eps, z):
    """The custom VJP's one-pass logit gradient against the closed form in float64:
    d/dlogits = w · [(1 + 2·z·log Z) · softmax - (1 - eps) · onehot - eps / V]."""
    logits, targets, weights = example(6)

    def total(lg):
        return cross_entropy_sums(lg, jnp.asarray(targets), jnp.asarray(weights),
                                  label_smoothing=eps, z_loss=z)["loss_sum"]

    got = np.asarray(jax.grad(total)(jnp.asarray(logits)))
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    softmax = np.exp(x - log_z[..., None])
    want = weights[..., None] * ((1 + 2 * z * log_z)[..., None] * softmax
                                 - (1 - eps) * np.eye(V)[targets] - eps / V)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gradient_under_jit_and_vmap_equals_eager():
    logits, targets, weights = example(7)

    def total(lg, t, w):
        return cross_entropy_sums(lg, t, w, z_loss=1e-3)["loss_sum"]

    args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    eager = jax.grad(total)(*args)
    per_row = jax.jit(jax.vmap(jax.grad(total)))(*(a[:, None] for a in args))[:, 0]
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(eager), rtol=1e-6, atol=1e-7)


def test_accuracy_counts_the_argmax_and_ties():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 0, 2] = 1.0   # target 2 is the argmax
    logits[0, 1, 1] = 1.0   # target 3 is not
    # row 2: all equal, a tie: counted as a hit
    out = cross_entropy_sums(jnp.asarray(logits), jnp.asarray([[2, 3, 0]]),
                             jnp.ones((1, 3), jnp.float32))
    assert float(out["correct_sum"]) == 2.0
