"""Position-wise feed-forward blocks: plain MLPs and gated linear units (GLU variants).

Letters: B batch, T length, D model width, F hidden (mlp) width, M = all leading axes
flattened into one (B*T rows).

Activations (names follow Hugging Face's ``ACT2FN`` where they overlap):

    relu        Linear -> ReLU -> Linear (Vaswani et al., 2017)
    gelu        Linear -> GELU, exact erf form -> Linear (BERT, HF "gelu")
    gelu_tanh   Linear -> GELU, tanh approximation -> Linear (GPT-2, HF "gelu_new")
    swiglu      wo(silu(x wi_gate) * (x wi_up))  (Shazeer 2020; Llama, Mistral)
    geglu       wo(gelu(x wi_gate) * (x wi_up)), exact erf GELU (Shazeer 2020 as written)
    geglu_tanh  the same with the tanh-approximate GELU: T5 v1.1 / Flan-T5 "gated-gelu", whose
                Hugging Face implementation uses ``gelu_new`` (tanh), and Gemma's MLP
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import GATED_ACTIVATIONS, default_d_ff
from jaxformer.nn.lora_branch import branch_output
from jaxformer.nn.params import constant_param, normal_param

__all__ = ["ACTIVATIONS", "GATED_ACTIVATIONS", "FeedForward", "activation_fn", "apply_in_chunks",
           "default_d_ff"]

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "gelu": lambda h: jax.nn.gelu(h, approximate=False),
    "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),
    "swiglu": jax.nn.silu,
    "geglu": lambda h: jax.nn.gelu(h, approximate=False),
    "geglu_tanh": lambda h: jax.nn.gelu(h, approximate=True),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def activation_fn(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The elementwise function behind ``name`` (for a gated name, the gate's nonlinearity)."""
    _check_activation(name)
    return _ACTIVATIONS[name]


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


class FeedForward(nnx.Module):
    """Position-wise feed-forward block, plain or gated (see the module docstring).

    Params, by logical axes:
      plain: ``wi`` [D, F] (embed, mlp), ``wo`` [F, D] (mlp, embed); with ``use_bias`` also
             ``bi`` [F] (mlp) and ``bo`` [D] (embed).
      gated: ``wi_gate`` [D, F], ``wi_up`` [D, F] (embed, mlp), ``wo`` [F, D] (mlp, embed);
             with ``use_bias`` also ``bi_gate``, ``bi_up`` [F] (mlp) and ``bo`` [D] (embed).
    Input projections are drawn from N(0, init_std^2), ``wo`` from N(0, out_std^2) (the output
    projection into the residual stream usually starts smaller); biases start at 0.
    """

    LORA_BRANCH = True  # _linear adds LoRA branches (nn.lora_branch)

    def __init__(self, d_model: int, d_ff: int, *, activation: str, use_bias: bool,
                 init_std: float, out_std: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        _check_activation(activation)
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.dtype = dtype

        def w_in() -> nnx.Param:
            return normal_param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std, param_dtype)

        def b(size: int, axis: str) -> nnx.Param | None:
            return constant_param((size,), (axis,), 0.0, param_dtype) if use_bias else None

        if self.gated:
            self.wi_gate, self.bi_gate = w_in(), b(d_ff, "mlp")
            self.wi_up, self.bi_up = w_in(), b(d_ff, "mlp")
        else:
            self.wi, self.bi = w_in(), b(d_ff, "mlp")
        self.wo = normal_param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std, param_dtype)
        self.bo = b(d_model, "embed")

    def _linear(self, x: jnp.ndarray, name: str) -> jnp.ndarray:
        """x: [M, in] @ the kernel ``name`` [in, out] (+ its bias [out], + a LoRA branch)
        -> [M, out] in the compute dtype."""
        bias = getattr(self, "b" + name[1:])
        y = x @ getattr(self, name)[...].astype(self.dtype)
        extra = branch_output(self, name, x)
        y = y if extra is None else y + extra
        return y if bias is None else y + bias[...].astype(self.dtype)

    def __call__(self, x: jnp.ndarray, chunks: int = 1) -> jnp.ndarray:
        """x: [..., D] (typically [B, T, D]) -> [..., D] in the compute dtype.

        chunks > 1 (x [B, T, D]): the rows of ``chunks`` slices of the length in turn
        (``apply_in_chunks``), so the [B, T, F] hidden activations never exist whole.
        """
        if chunks > 1:
            return apply_in_chunks(self._apply, x, chunks)
        return self._apply(x)

    def _apply(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        # Flatten to [M, D] and use 2-D matmuls: on CPU the 3-D einsum 'BTD,DF->BTF' was
        # measured slower, by up to 2.5x in the backward pass, where the weight gradients
        # contract over both B and T.
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.gated:
            h = act(self._linear(x2, "wi_gate")) * self._linear(x2, "wi_up")
        else:
            h = act(self._linear(x2, "wi"))
        y = self._linear(h, "wo")
        return y.reshape(*x.shape[:-1], y.shape[-1])


def apply_in_chunks(fn: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray,
                    chunks: int) -> jnp.ndarray:
    """A position-wise ``fn`` over x [B, T, ...] in ``chunks`` slices of the length, one after
    the other (Reformer's chunked feed-forward, Kitaev et al. 2020 §3): -> fn(x) [B, T, ...].

    Each slice runs under ``jax.checkpoint`` inside a ``lax.map``, so neither the forward nor
    the backward pass holds more than one slice's intermediates (the backward recomputes them
    slice by slice). Any T: the length is zero-padded up to whole slices of ceil(T / chunks)
    (at most one slice's worth of extra rows, cut off again); T <= 1 or chunks <= 1 runs fn
    once on all of x.
    """
    b, t = x.shape[:2]
    if chunks <= 1 or t <= 1:
        return fn(x)
    size = -(-t // min(chunks, t))  # rows per slice
    n = -(-t // size)  # slices (no slice only padding)
    pad = n * size - t
    xp = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    xs = jnp.swapaxes(xp.reshape(b, n, size, *x.shape[2:]), 0, 1)  # [n, B, size, ...]
    ys = jax.lax.map(jax.checkpoint(fn, prevent_cse=False), xs)
    y = jnp.swapaxes(ys, 0, 1)
    return y.reshape(b, n * size, *y.shape[3:])[:, :t]


class GeluMlp(FeedForward):
    """The GPT-2 MLP: Linear(D->F) -> GELU (tanh approximation) -> Linear(F->D), with biases.

    ``FeedForward(activation="gelu_tanh", use_bias=True)``; params ``wi``, ``bi``, ``wo``, ``bo``.
    """

    def __init__(self, d_model: int, d_ff: int, *, init_std: float, out_std: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(d_model, d_ff, activation="gelu_tanh", use_bias=True,
                         init_std=init_std, out_std=out_std, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

