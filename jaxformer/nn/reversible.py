"""Reversible residual stacks: backprop that recomputes activations instead of storing them.

Gomez, Ren, Urtasun and Grosse (2017), "The Reversible Residual Network: Backpropagation
Without Storing Activations" (NeurIPS 2017); used for Transformers by Kitaev, Kaiser and
Levskaya (2020), "Reformer: The Efficient Transformer" (f = attention, g = feed-forward).

Letters: L layers; x1, x2 are any two arrays (pytrees of arrays) of the same structure, e.g.
[B, T, D] each, the two halves of the residual stream.

Layer l with parameters (p_f[l], p_g[l]) maps (X1, X2) to

    Y1 = X1 + f(p_f, X2),        Y2 = X2 + g(p_g, Y1),

which inverts exactly as

    X2 = Y2 - g(p_g, Y1),        X1 = Y1 - f(p_f, X2).

``reversible_stack`` is a ``jax.custom_vjp``: its forward pass keeps only the final (Y1, Y2)
and the parameters; its backward pass walks the layers last to first, rebuilding each layer's
inputs from its outputs with the inverse and pulling the cotangents through ``jax.vjp`` of
f and g, so the memory for activations is that of one layer whatever L is (at the price of
running f and g twice). Reconstruction is exact in exact arithmetic; in floating point it
drifts by a few ulps per layer, which is why the tests compare at 1e-5.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

PyTree = Any
LayerFn = Callable[[PyTree, PyTree], PyTree]


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y, a, b)


def _sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)


def reversible_layer(f: LayerFn, g: LayerFn, p_f: PyTree, p_g: PyTree, x1: PyTree,
                     x2: PyTree) -> tuple[PyTree, PyTree]:
    """One layer forward: (Y1, Y2) = (X1 + f(p_f, X2), X2 + g(p_g, Y1))."""
    y1 = _add(x1, f(p_f, x2))
    return y1, _add(x2, g(p_g, y1))


def reversible_layer_inverse(f: LayerFn, g: LayerFn, p_f: PyTree, p_g: PyTree, y1: PyTree,
                             y2: PyTree) -> tuple[PyTree, PyTree]:
    """One layer backward in value: (X1, X2) = (Y1 - f(p_f, X2), X2) with X2 = Y2 - g(p_g, Y1)."""
    x2 = _sub(y2, g(p_g, y1))
    return _sub(y1, f(p_f, x2)), x2


def _forward(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, x1: PyTree,
             x2: PyTree) -> tuple[PyTree, PyTree]:
    def step(carry: tuple[PyTree, PyTree], params: tuple[PyTree, PyTree]):
        return reversible_layer(f, g, *params, *carry), None

    (y1, y2), _ = lax.scan(step, (x1, x2), (params_f, params_g))
    return y1, y2


def reversible_inverse(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, y1: PyTree,
                       y2: PyTree) -> tuple[PyTree, PyTree]:
    """The stack's inputs (x1, x2) from its outputs (y1, y2), inverting the layers last first.

    params_f / params_g: pytrees whose leaves carry a leading layer axis L (as scan xs).
    """
    def step(carry: tuple[PyTree, PyTree], params: tuple[PyTree, PyTree]):
        return reversible_layer_inverse(f, g, *params, *carry), None

    (x1, x2), _ = lax.scan(step, (y1, y2), (params_f, params_g), reverse=True)
    return x1, x2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, x1: PyTree,
                x2: PyTree) -> tuple[PyTree, PyTree]:
    return _forward(f, g, params_f, params_g, x1, x2)


def _reversible_fwd(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, x1: PyTree,
                    x2: PyTree):
    y1, y2 = _forward(f, g, params_f, params_g, x1, x2)
    # Only the outputs and the parameters: every earlier activation is recomputed backward.
    return (y1, y2), (params_f, params_g, y1, y2)


def _reversible_bwd(f: LayerFn, g: LayerFn, residuals, cotangents):
    params_f, params_g, y1, y2 = residuals
    dy1, dy2 = cotangents

    def step(carry, params):
        y1, y2, dy1, dy2 = carry
        p_f, p_g = params
        # Y2 = X2 + g(Y1): rebuild X2, send dY2 into g's parameters and input Y1.
        g_out, g_vjp = jax.vjp(g, p_g, y1)
        x2 = _sub(y2, g_out)
        dp_g, dy1_via_g = g_vjp(dy2)
        dy1 = _add(dy1, dy1_via_g)
        # Y1 = X1 + f(X2): rebuild X1, send the total dY1 into f's parameters and input X2.
        f_out, f_vjp = jax.vjp(f, p_f, x2)
        x1 = _sub(y1, f_out)
        dp_f, dx2_via_f = f_vjp(dy1)
        return (x1, x2, dy1, _add(dy2, dx2_via_f)), (dp_f, dp_g)

    (_, _, dx1, dx2), (dparams_f, dparams_g) = lax.scan(
        step, (y1, y2, dy1, dy2), (params_f, params_g), reverse=True)
    return dparams_f, dparams_g, dx1, dx2


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, x1: PyTree,
                     x2: PyTree) -> tuple[PyTree, PyTree]:
    """L reversible layers ``Y1 = X1 + f(p_f, X2), Y2 = X2 + g(p_g, Y1)``; returns (y1, y2).

    f(p, x) and g(p, x) are pure functions returning x's structure (e.g. x [B, T, D] ->
    [B, T, D]); they must not close over traced values (pass those in the params), since
    custom_vjp treats f and g as static. params_f / params_g: pytrees with a leading layer axis
    L on every leaf. Gradients wrt params and inputs use O(1)-in-L activation memory.
    """
    return _reversible(f, g, params_f, params_g, x1, x2)
