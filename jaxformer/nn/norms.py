"""Normalization layers over the last axis, and ``make_norm`` to pick one by name.

Letters: D model width (the normalized axis); ``...`` any leading axes.

Every norm computes in float32 and casts back to the input dtype: in bfloat16 the mean of
squares over a wide D loses too many bits, and the design keeps norms, softmax and loss in
float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import constant_param

NORM_KINDS = ("layernorm", "rmsnorm", "scalenorm")


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al., 2016): y = (x - mean) / sqrt(var + eps) * scale (+ bias).

    Params: ``scale`` [D] (init 1) and, when ``use_bias``, ``bias`` [D] (init 0); both on the
    logical axis ``embed``. ``use_bias=False`` is the bias-free LayerNorm of PaLM / OLMo.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True,
                 param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = constant_param((dim,), ("embed",), 1.0, param_dtype)
        # None rather than a zero param: the checkpoint and the optimizer then hold no bias.
        self.bias = constant_param((dim,), ("embed",), 0.0, param_dtype) if use_bias else None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., D] -> [..., D] in x.dtype."""
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        # Two-pass variance: E[x^2] - E[x]^2 cancels badly when |mean| >> std.
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * scale.

    The form of Llama's ``LlamaRMSNorm`` and T5's ``T5LayerNorm`` (no mean subtraction, no
    bias). Param: ``scale`` [D] (init 1) on ``embed``. One difference in low precision: those
    cast the normalized x back to the input dtype *before* multiplying by the weight; here the
    product is also taken in float32 and rounded once.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = constant_param((dim,), ("embed",), 1.0, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., D] -> [..., D] in x.dtype."""
        x32 = x.astype(jnp.float32)
        ms = jnp.square(x32).mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(ms + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ScaleNorm(nnx.Module):
    """ScaleNorm (Nguyen & Salazar, 2019): y = g * x / max(||x||_2, eps).

    Param: ``scale``, the paper's single learned scalar g (shape [], logical axes ()), named
    like the other norms' gain; initialized to sqrt(D) as in the paper, so that at init the
    output has unit RMS like LayerNorm's.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = constant_param((), (), float(dim) ** 0.5, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., D] -> [..., D] in x.dtype."""
        x32 = x.astype(jnp.float32)
        sq = jnp.square(x32).sum(-1, keepdims=True)
        # max(||x||, eps) == sqrt(max(||x||^2, eps^2)); clamping before the square root keeps
        # the gradient finite on an all-zero (padding) row, where d sqrt(s)/ds is infinite.
        y = x32 * jax.lax.rsqrt(jnp.maximum(sq, self.eps**2)) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(kind: str, dim: int, *, eps: float, use_bias: bool = True,
              param_dtype: jnp.dtype = jnp.float32) -> LayerNorm | RMSNorm | ScaleNorm:
    """The norm named ``kind`` ("layernorm" | "rmsnorm" | "scalenorm") over a last axis of ``dim``.

    ``use_bias`` applies to "layernorm" only; RMSNorm and ScaleNorm have no bias by definition.
    """
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, use_bias=use_bias, param_dtype=param_dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    if kind == "scalenorm":
        return ScaleNorm(dim, eps=eps, param_dtype=param_dtype)
    raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
