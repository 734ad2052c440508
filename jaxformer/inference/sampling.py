"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p (nucleus).

Letters: B batch, P prompt length, V vocabulary, S cache length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
    """Masks tokens outside the top-k and outside the smallest set whose probability reaches
    top_p. logits: [B, V] float32 -> [B, V] with excluded entries at -inf."""
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass of the tokens ranked above it is still below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def sample_token(logits: jnp.ndarray, key: jax.Array, params: SamplingParams) -> jnp.ndarray:
    """logits: [B, V] -> next token ids [B]."""
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Generates continuations of prompts from a decoder-only model's parameters."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, max_len: int):
        self.graphdef = graphdef
        self.params = params
        self.max_len = max_len

    @functools.partial(jax.jit, static_argnums=(0,))
    def _prefill(self, params, tokens, cache):
        model = nnx.merge(self.graphdef, params)
        logits, cache = model.decode(tokens, cache, jnp.zeros((), jnp.int32))
        return logits[:, -1], cache

    @functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4,))
    def _step(self, params, token, index, cache, key, sampling: SamplingParams):
        model = nnx.merge(self.graphdef, params)
        logits, cache = model.decode(token[:, None], cache, index)
        return sample_token(logits[:, -1], key, sampling), cache

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams,
                 seed: int = 0, stop_token: int | None = None) -> list[int]:
        """Returns the new tokens (without the prompt); stops early at ``stop_token``."""
        if not prompt:
            raise UserError("the prompt is empty: give at least one token of text")
        total = len(prompt) + max_new_tokens
        if total > self.max_len:
            raise UserError(f"prompt ({len(prompt)} tokens) + max new tokens ({max_new_tokens})"
                            f" = {total} exceeds the model's max_len {self.max_len}")
        model = nnx.merge(self.graphdef, self.params)
        cache = model.init_cache(1, total)
        tokens = jnp.asarray([prompt], jnp.int32)
        last_logits, cache = self._prefill(self.params, tokens, cache)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        token = sample_token(last_logits, sub, sampling)
        out = []
        for i in range(max_new_tokens):
            tok = int(token[0])
            out.append(tok)
            if tok == stop_token or i == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            index = jnp.asarray(len(prompt) + i, jnp.int32)
            token, cache = self._step(self.params, token, index, cache, sub, sampling)
        return out
