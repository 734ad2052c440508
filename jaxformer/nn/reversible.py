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

A ``context`` pytree shared by every layer (a model's attention masks, positions, a learned
relative-position bias) is an explicit argument too: f and g then take ``(p, x, context)``,
and its cotangent is the sum over layers. Leaves that are not floating point (integers,
booleans, PRNG keys) get no cotangent, so per-layer dropout keys can ride in the parameters:
the backward pass calls f and g with the same keys and so redraws the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

PyTree = Any
LayerFn = Callable[[PyTree, PyTree], PyTree]
ContextFn = Callable[[PyTree, PyTree, PyTree], PyTree]  # f(p, x, context)


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


def _forward(f: ContextFn, g: ContextFn, params_f: PyTree, params_g: PyTree, context: PyTree,
             x1: PyTree, x2: PyTree) -> tuple[PyTree, PyTree]:
    def step(carry: tuple[PyTree, PyTree], params: tuple[PyTree, PyTree]):
        p_f, p_g = params
        y1 = _add(carry[0], f(p_f, carry[1], context))
        return (y1, _add(carry[1], g(p_g, y1, context))), None

    (y1, y2), _ = lax.scan(step, (x1, x2), (params_f, params_g))
    return y1, y2


def reversible_inverse(f: LayerFn, g: LayerFn, params_f: PyTree, params_g: PyTree, y1: PyTree,
                       y2: PyTree, context: PyTree = None) -> tuple[PyTree, PyTree]:
    """The stack's inputs (x1, x2) from its outputs (y1, y2), inverting the layers last first.

    params_f / params_g: pytrees whose leaves carry a leading layer axis L (as scan xs);
    context: as in ``reversible_stack``.
    """
    f, g = _with_context(f, context), _with_context(g, context)

    def step(carry: tuple[PyTree, PyTree], params: tuple[PyTree, PyTree]):
        p_f, p_g = params
        x2 = _sub(carry[1], g(p_g, carry[0], context))
        return (_sub(carry[0], f(p_f, x2, context)), x2), None

    (x1, x2), _ = lax.scan(step, (y1, y2), (params_f, params_g), reverse=True)
    return x1, x2


@dataclasses.dataclass(frozen=True)
class _NoContext:
    """f(p, x) as f(p, x, context), ignoring the context (hashable: a static custom_vjp arg)."""

    fn: LayerFn

    def __call__(self, p: PyTree, x: PyTree, context: PyTree) -> PyTree:
        return self.fn(p, x)


def _with_context(fn: Callable[..., PyTree], context: PyTree) -> ContextFn:
    return _NoContext(fn) if context is None else fn


def _differentiable(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(jax.numpy.result_type(leaf), jax.numpy.inexact)


class _Split:
    """A pytree's floating-point leaves (``diff``) apart from the rest (ints, bools, keys),
    which get no cotangent: ``join`` rebuilds the tree, ``cotangent`` gives the tree of
    cotangents with None where a leaf has none."""

    def __init__(self, tree: PyTree):
        self.leaves, self.treedef = jax.tree.flatten(tree)
        self.mask = [_differentiable(leaf) for leaf in self.leaves]
        self.diff = [leaf for leaf, m in zip(self.leaves, self.mask, strict=True) if m]

    def _fill(self, diff: list, rest: list) -> PyTree:
        it = iter(diff)
        return self.treedef.unflatten([next(it) if m else r
                                       for m, r in zip(self.mask, rest, strict=True)])

    def join(self, diff: list) -> PyTree:
        return self._fill(diff, self.leaves)

    def cotangent(self, diff: list) -> PyTree:
        return self._fill(diff, [None] * len(self.leaves))


def _layer_vjp(fn: ContextFn, p: PyTree, x: PyTree, context: PyTree, cot: PyTree):
    """fn(p, x, context) and the cotangents of its floating-point inputs for ``cot``:
    -> (output, d p's float leaves (list), d x, d context's float leaves (list))."""
    ps, cs = _Split(p), _Split(context)
    out, pull = jax.vjp(lambda pd, xx, cd: fn(ps.join(pd), xx, cs.join(cd)), ps.diff, x, cs.diff)
    dp, dx, dc = pull(cot)
    return out, dp, dx, dc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible(f: ContextFn, g: ContextFn, params_f: PyTree, params_g: PyTree,
                context: PyTree, x1: PyTree, x2: PyTree) -> tuple[PyTree, PyTree]:
    return _forward(f, g, params_f, params_g, context, x1, x2)


def _reversible_fwd(f: ContextFn, g: ContextFn, params_f: PyTree, params_g: PyTree,
                    context: PyTree, x1: PyTree, x2: PyTree):
    y1, y2 = _forward(f, g, params_f, params_g, context, x1, x2)
    # Only the outputs, the parameters and the context: every earlier activation is
    # recomputed backward.
    return (y1, y2), (params_f, params_g, context, y1, y2)


def _reversible_bwd(f: ContextFn, g: ContextFn, residuals, cotangents):
    params_f, params_g, context, y1, y2 = residuals
    dy1, dy2 = cotangents
    split_f, split_g, split_c = _Split(params_f), _Split(params_g), _Split(context)
    dc0 = [jax.numpy.zeros_like(leaf) for leaf in split_c.diff]

    def step(carry, params):
        y1, y2, dy1, dy2, dc = carry
        p_f, p_g = params
        # Y2 = X2 + g(Y1): rebuild X2, send dY2 into g's parameters and input Y1.
        g_out, dp_g, dy1_via_g, dc_g = _layer_vjp(g, p_g, y1, context, dy2)
        x2 = _sub(y2, g_out)
        dy1 = _add(dy1, dy1_via_g)
        # Y1 = X1 + f(X2): rebuild X1, send the total dY1 into f's parameters and input X2.
        f_out, dp_f, dx2_via_f, dc_f = _layer_vjp(f, p_f, x2, context, dy1)
        x1 = _sub(y1, f_out)
        dc = [a + b + c for a, b, c in zip(dc, dc_g, dc_f, strict=True)]
        return (x1, x2, dy1, _add(dy2, dx2_via_f), dc), (dp_f, dp_g)

    (_, _, dx1, dx2, dc), (dparams_f, dparams_g) = lax.scan(
        step, (y1, y2, dy1, dy2, dc0), (params_f, params_g), reverse=True)
    return (split_f.cotangent(dparams_f), split_g.cotangent(dparams_g), split_c.cotangent(dc),
            dx1, dx2)


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(f: Callable[..., PyTree], g: Callable[..., PyTree], params_f: PyTree,
                     params_g: PyTree, x1: PyTree, x2: PyTree,
                     context: PyTree = None) -> tuple[PyTree, PyTree]:
    """L reversible layers ``Y1 = X1 + f(p_f, X2), Y2 = X2 + g(p_g, Y1)``; returns (y1, y2).

    f(p, x) and g(p, x) (with a ``context``: f(p, x, context), g(p, x, context)) are pure
    functions returning x's structure (e.g. x [B, T, D] -> [B, T, D]); they must not close
    over traced values (pass those in the params or the context), since custom_vjp treats f
    and g as static. params_f / params_g: pytrees with a leading layer axis L on every leaf;
    context: one pytree every layer sees (None: none). Gradients wrt the params, the context
    and the inputs use O(1)-in-L activation memory; leaves that are not floating point get
    None as cotangent.
    """
    return _reversible(_with_context(f, context), _with_context(g, context), params_f,
                       params_g, context, x1, x2)
