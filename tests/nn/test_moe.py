"""Mixture-of-experts block against a naive per-token numpy reference written here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.nn.moe import MoEFeedForward

D, F, E = 8, 12, 4
B, T = 2, 7  # N = 14 tokens

_erf = np.vectorize(math.erf)
NAIVE_ACT = {"gelu": lambda h: 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0))),
             "swiglu": lambda h: h / (1.0 + np.exp(-h))}
GATED = ("swiglu",)

# Dispatch variants: (capacity_factor, dropless_impl). A capacity factor of E/K gives C = S: no
# expert can overflow, so the capacity path must equal the dropless one.
DROPLESS_RAGGED, DROPLESS_DENSE, CAPACITY_FULL = (0.0, "ragged"), (0.0, "dense"), (E, "auto")


def _moe(*, top_k=2, activation="swiglu", n_shared=0, capacity_factor=0.0, impl="auto",
         normalize=True, group_size=4, dtype=jnp.float32, param_dtype=jnp.float32,
         router_dtype=jnp.float32, seed=0) -> MoEFeedForward:
    # Router std 1.0 gives well-separated probabilities, so float32 and the float64 reference
    # pick the same experts (checked by `_margin`).
    return MoEFeedForward(D, F, n_experts=E, top_k=top_k, capacity_factor=capacity_factor,
                          n_shared_experts=n_shared, activation=activation, init_std=0.4,
                          out_std=0.3, dtype=dtype, param_dtype=param_dtype,
                          router_dtype=router_dtype, rngs=nnx.Rngs(seed),
                          normalize_top_k=normalize, group_size=group_size,
                          dropless_impl=impl, router_init_std=1.0)


def _weights(m: MoEFeedForward) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...], np.float64)
            for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _x(seed=1, shape=(B, T, D)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _mlp(act, gated, w_in, w_up, w_out, x):
    """One expert (or the shared block) on one token or a batch of rows."""
    h = act(x @ w_in) * (x @ w_up) if gated else act(x @ w_in)
    return h @ w_out


def _naive(m: MoEFeedForward, x: np.ndarray, mask: np.ndarray | None = None,
           capacity: bool = False):
    """-> (y [B, T, D], kept [N, K] bool, top [N, K], probs [N, E], logits [N, E])."""
    w = _weights(m)
    act, gated, K = NAIVE_ACT[m.activation], m.activation in GATED, m.top_k
    x2 = x.reshape(-1, D)
    N = len(x2)
    valid = np.ones(N, bool) if mask is None else mask.reshape(N).astype(bool)
    logits = x2 @ w["router"]
    probs = _softmax(logits)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :K]  # ties: the lower expert index
    gates = np.take_along_axis(probs, top, axis=1)
    if m.normalize_top_k and K > 1:
        gates = gates / gates.sum(1, keepdims=True)
    kept = np.repeat(valid[:, None], K, axis=1)
    if capacity:
        # Documented rule, recomputed here: G = ceil(N / group_size), S = ceil(N / G),
        # C = ceil(cf * S * K / E) capped at S; priority: all first choices of a group in token
        # order, then all second choices.
        G = -(-N // m.group_size)
        S = -(-N // G)
        C = max(1, min(S, math.ceil(m.capacity_factor * S * K / E)))
        assert m.groups_and_capacity(N) == (G, S, C)
        for g in range(G):
            used = np.zeros(E, int)
            for k in range(K):
                for n in range(g * S, min((g + 1) * S, N)):
                    if not valid[n]:
                        continue
                    e = top[n, k]
                    kept[n, k] = used[e] < C
                    used[e] += 1
    y = np.zeros_like(x2)
    for n in range(N):
        for k in range(K):
            if kept[n, k]:
                e = top[n, k]
                if gated:
                    expert = _mlp(act, True, w["wi_gate"][e], w["wi_up"][e], w["wo"][e], x2[n])
                else:
                    expert = _mlp(act, False, w["wi"][e], None, w["wo"][e], x2[n])
                y[n] += gates[n, k] * expert
    if m.shared is not None:
        if gated:
            y += _mlp(act, True, w["shared/wi_gate"], w["shared/wi_up"], w["shared/wo"], x2)
        else:
            y += _mlp(act, False, w["shared/wi"], None, w["shared/wo"], x2)
    return y.reshape(x.shape), kept, top, probs, logits


def _margin(probs: np.ndarray, K: int) -> float:
    """Gap between the K-th and (K+1)-th largest probability: the routing is stable if > 0."""
    s = -np.sort(-probs, axis=1)
    return float(np.min(s[:, K - 1] - s[:, K]))


def _call(m, x, mask=None):
    # Eager: the primitives' compilations are cached across configurations, cheaper here than
    # one jit compilation per configuration.
    y, stats = m(jnp.asarray(x, jnp.float32), None if mask is None else jnp.asarray(mask))
    return np.asarray(y, np.float64), {k: np.asarray(v, np.float64) for k, v in stats.items()}


@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k,normalize", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("dispatch", [DROPLESS_RAGGED, DROPLESS_DENSE, CAPACITY_FULL],
                         ids=["ragged", "dense", "capacity"])
def test_matches_naive(dispatch, top_k, normalize, activation, n_shared):
    cf, impl = dispatch
    m = _moe(top_k=top_k, activation=activation, n_shared=n_shared, capacity_factor=cf,
             impl=impl, normalize=normalize)
    x = _x()
    want, kept, _, probs, _ = _naive(m, x, capacity=cf > 0)
    assert _margin(probs, top_k) > 1e-4
    assert kept.all()
    y, stats = _call(m, x)
    assert y.shape == (B, T, D)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
    assert stats["dropped_fraction"] == 0.0
    if n_shared:
        assert m.shared.wo.shape == (n_shared * F, D)


@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_with_priority(top_k, n_shared):
    # 14 tokens, group_size 4 -> G = 4 groups of S = 4 (2 padded slots); cf 0.5 -> C = 1 (k=1)
    # or C = 1 (k=2): heavy dropping.
    m = _moe(top_k=top_k, n_shared=n_shared, capacity_factor=0.5, group_size=4)
    x = _x(seed=3)
    want, kept, _, probs, _ = _naive(m, x, capacity=True)
    assert _margin(probs, top_k) > 1e-4
    y, stats = _call(m, x)
    n_assign = kept.size
    np.testing.assert_allclose(stats["dropped_fraction"], 1.0 - kept.sum() / n_assign,
                               atol=1e-7)
    assert 0.2 < stats["dropped_fraction"] < 0.9  # the test exercises dropping
    # Kept choices (and partially kept tokens) match the reference.
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
    # Fully dropped tokens get no routed output: exactly 0, or exactly the shared output.
    dropped = ~kept.any(1)
    assert dropped.any() and (~dropped).any()
    y2 = y.reshape(-1, D)
    if n_shared:
        shared = np.asarray(m.shared(jnp.asarray(x, jnp.float32)), np.float64).reshape(-1, D)
        np.testing.assert_array_equal(y2[dropped], shared[dropped])
    else:
        np.testing.assert_array_equal(y2[dropped], 0.0)
        assert np.all(np.abs(y2[~dropped]).max(1) > 0)


def _naive_stats(m, x, mask=None):
    _, _, top, probs, logits = _naive(m, x, mask)
    valid = np.ones(len(probs), bool) if mask is None else mask.reshape(-1).astype(bool)
    top, probs, logits = top[valid], probs[valid], logits[valid]
    f = np.array([(top == e).sum() for e in range(E)]) / top.size  # assignments / (n K)
    P = probs.mean(0)
    lse = np.log(np.exp(logits).sum(1))
    return {"load_balance_loss": E * np.sum(f * P), "router_z_loss": np.mean(lse**2),
            "expert_load": f}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dispatch", [DROPLESS_RAGGED, CAPACITY_FULL], ids=["ragged", "cap"])
def test_stats_match_naive(dispatch, top_k):
    m = _moe(top_k=top_k, capacity_factor=dispatch[0], impl=dispatch[1])
    x = _x(seed=4)
    mask = np.ones((B, T), bool)
    mask[0, :3] = mask[1, 5:] = False
    for msk in (None, mask):
        _, stats = _call(m, x, msk)
        want = _naive_stats(m, x, msk)
        for key in ("load_balance_loss", "router_z_loss"):
            np.testing.assert_allclose(stats[key], want[key], rtol=1e-5)
        np.testing.assert_allclose(stats["expert_load"], want["expert_load"], atol=1e-7)
        assert stats["expert_load"].shape == (E,)
        np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-6)
        assert stats["load_balance_loss"] > 1.0  # random routing is not balanced


@pytest.mark.parametrize("top_k", [1, 2])
def test_uniform_router_gives_balance_loss_one(top_k):
    m = _moe(top_k=top_k)
    m.router[...] = jnp.zeros_like(m.router[...])  # every prob = 1/E
    _, stats = _call(m, _x(seed=5))
    # P_e = 1/E for all e, so E * sum_e f_e P_e = sum_e f_e = 1 whatever f is. Ties go to the
    # lowest indices: every token picks experts 0..K-1, so f = 1/K on those, 0 elsewhere.
    np.testing.assert_allclose(stats["load_balance_loss"], 1.0, atol=1e-6)
    np.testing.assert_allclose(stats["expert_load"], [1 / top_k] * top_k + [0] * (E - top_k),
                               atol=1e-7)
    np.testing.assert_allclose(stats["router_z_loss"], math.log(E) ** 2, rtol=1e-6)


def test_balanced_assignments_and_probs_give_one():
    """f and P both uniform, from a router that routes token i to expert i (K = 1)."""
    m = _moe(top_k=1)
    x = np.zeros((B * T, D))
    x[:12, :E] = 3.0 * np.tile(np.eye(E), (3, 1))  # 12 tokens, 3 per expert
    mask = np.arange(B * T) < 12  # the other 2 are padding
    m.router[...] = jnp.zeros((D, E)).at[:E].set(jnp.eye(E))
    _, stats = _call(m, x.reshape(B, T, D), mask.reshape(B, T))
    np.testing.assert_allclose(stats["expert_load"], np.full(E, 1 / E), atol=1e-7)
    np.testing.assert_allclose(stats["load_balance_loss"], 1.0, atol=1e-6)


@pytest.mark.parametrize("dispatch", [DROPLESS_RAGGED, DROPLESS_DENSE, (0.5, "auto")],
                         ids=["ragged", "dense", "capacity"])
def test_padding_is_ignored(dispatch):
    """Padding tokens, placed first in priority order and routed by large inputs, change
    neither the other tokens' outputs and drops nor the statistics."""
    m = _moe(top_k=2, n_shared=1, capacity_factor=dispatch[0], impl=dispatch[1])
    x = _x(seed=6)
    mask = np.ones((B, T), bool)
    mask[:, :2] = False  # the first two tokens of each row
    x_other = x.copy()
    x_other[~mask] = 10.0 * _x(seed=7)[~mask]
    y1, s1 = _call(m, x, mask)
    y2, s2 = _call(m, x_other, mask.astype(np.float32))  # a float mask works too
    np.testing.assert_allclose(y1[mask], y2[mask], atol=1e-6)
    for key in s1:
        np.testing.assert_allclose(s1[key], s2[key], atol=1e-6)
    want, kept, _, _, _ = _naive(m, x, mask, capacity=dispatch[0] > 0)
    np.testing.assert_allclose(y1, want, atol=1e-5)  # padding: shared output only
    assert not kept[~mask.reshape(-1)].any()
    np.testing.assert_allclose(s1["dropped_fraction"],
                               1.0 - kept.sum() / (mask.sum() * 2), atol=1e-7)
    # The stats are those of the valid tokens alone.
    want_stats = _naive_stats(m, x[mask][None])
    for key in ("load_balance_loss", "router_z_loss", "expert_load"):
        np.testing.assert_allclose(s1[key], want_stats[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dispatch,top_k", [(DROPLESS_RAGGED, 1), (DROPLESS_DENSE, 2),
                                            ((1.0, "auto"), 2)], ids=["ragged", "dense", "cap"])
def test_gradients_reach_router_and_experts(dispatch, top_k):
    m = _moe(top_k=top_k, n_shared=1, capacity_factor=dispatch[0], impl=dispatch[1])
    x = jnp.asarray(_x(seed=8), jnp.float32)
    r = jnp.asarray(_x(seed=9), jnp.float32)

    def loss(model):
        y, stats = model(x)
        return jnp.sum(y * r)

    grads = nnx.to_flat_state(nnx.jit(nnx.grad(loss))(m))
    names = {"/".join(map(str, k)) for k, _ in grads}
    assert names == {"router", "wi_gate", "wi_up", "wo", "shared/wi_gate", "shared/wi_up",
                     "shared/wo"}
    for k, g in grads:
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), k
        assert np.abs(g).max() > 1e-4, k


def test_aux_losses_have_router_gradients():
    m = _moe(top_k=2, impl="dense")
    x = jnp.asarray(_x(seed=13), jnp.float32)

    def aux(model):
        stats = model(x)[1]
        return stats["load_balance_loss"] + stats["router_z_loss"]

    grads = nnx.jit(nnx.grad(aux))(m)
    g = np.asarray(grads.router[...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3
    assert np.abs(np.asarray(grads.wo[...])).max() == 0.0  # the experts do not enter the losses


@pytest.mark.parametrize("top_k,impl", [(1, "dense"), (2, "ragged")])
def test_router_gradient_matches_finite_differences(top_k, impl):
    with jax.enable_x64(True):
        f64 = jnp.float64
        m = _moe(top_k=top_k, impl=impl, dtype=f64, param_dtype=f64, router_dtype=f64)
        x = jnp.asarray(_x(seed=10), f64)
        r = jnp.asarray(_x(seed=11), f64)
        _, _, _, probs, _ = _naive(m, np.asarray(x))
        assert _margin(probs, top_k) > 1e-3  # eps below cannot change the routing

        graphdef, params = nnx.split(m)

        @jax.jit
        def loss(router, params):
            model = nnx.merge(graphdef, params)
            model.router[...] = router
            return jnp.sum(model(x)[0] * r)

        w0 = m.router[...]
        g = np.asarray(jax.jit(jax.grad(loss))(w0, params))
        assert g.dtype == np.float64
        eps = 1e-6
        for i, e in [(0, 0), (3, 2), (5, 3)]:
            up, down = loss(w0.at[i, e].add(eps), params), loss(w0.at[i, e].add(-eps), params)
            fd = (float(up) - float(down)) / (2 * eps)
            assert abs(fd) > 1e-3
            np.testing.assert_allclose(g[i, e], fd, rtol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_logical_axes(activation):
    m = _moe(activation=activation, n_shared=2)
    axes = {"/".join(map(str, k)): (v.shape, v.get_metadata()["logical_axes"])
            for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    inp = ((E, D, F), ("experts", "embed", "mlp"))
    shared_in = ((D, 2 * F), ("embed", "mlp"))
    want = {"router": ((D, E), ("embed", None)),
            "wo": ((E, F, D), ("experts", "mlp", "embed")),
            "shared/wo": ((2 * F, D), ("mlp", "embed"))}
    if activation in GATED:
        want |= {"wi_gate": inp, "wi_up": inp, "shared/wi_gate": shared_in,
                 "shared/wi_up": shared_in}
    else:
        want |= {"wi": inp, "shared/wi": shared_in}
    assert axes == want


def test_dtypes():
    m = _moe(top_k=2, impl="dense", dtype=jnp.bfloat16)
    y, stats = m(jnp.asarray(_x(seed=12), jnp.float32))
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in stats.values())
    assert m.router[...].dtype == jnp.float32


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        _moe(top_k=E + 1)
    with pytest.raises(ValueError, match="activation"):
        _moe(activation="tanh")
    with pytest.raises(ValueError, match="dropless_impl"):
        _moe(impl="sparse")
