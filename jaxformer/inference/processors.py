"""Logits processors with Hugging Face transformers' semantics, as pure jittable functions.

``process_logits`` applies, in the order transformers' ``generate`` builds them
(``GenerationMixin._get_logits_processor``): the repetition penalty
(``RepetitionPenaltyLogitsProcessor``), the no-repeat n-gram ban
(``NoRepeatNGramLogitsProcessor``), the presence and frequency penalties, then, only when
sampling, temperature (``TemperatureLogitsWarper``), top-k (``TopKLogitsWarper``), top-p
(``TopPLogitsWarper``) and min-p (``MinPLogitsWarper``), each with ``min_tokens_to_keep=1``
(transformers' value when not beam searching). Excluded tokens get -inf, as in transformers.

transformers has no presence/frequency processor: these follow OpenAI's formula,
``logit[t] -= frequency * count[t] + presence * (count[t] > 0)``, placed after the other
history penalties (where a user processor would go, before the warpers). ``count`` counts the
whole valid history (prompt and generated tokens), as the repetition penalty does; OpenAI
counts only the tokens sampled so far.

Every ``SamplingParams`` field is static (the dataclass is frozen and hashable: pass it as a
static argument to ``jax.jit``) and a field at its disabling value adds no operation, so greedy
decoding with default penalties traces to nothing but the argmax.

Letters: B batch, V vocabulary, L history length, N n-gram size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy (argmax after the processors; no warpers)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    # 1 disables. CTRL, as transformers: divide positive logits, multiply negative ones, of
    # every token present in the history (once per token, however often it occurs).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI semantics: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI semantics: logit -= frequency * count
    no_repeat_ngram_size: int = 0  # 0 disables; bans tokens that would repeat an n-gram

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        """Raises UserError (one line naming the CLI flag) for an out-of-range value."""
        def bad(flag: str, rule: str, value: object) -> UserError:
            return UserError(f"--{flag} must be {rule}, got {value}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "finite and >= 0", self.temperature)
        if self.top_k < 0:
            raise bad("top-k", ">= 0", self.top_k)
        if not 0 < self.top_p <= 1:
            raise bad("top-p", "in (0, 1]", self.top_p)
        if not 0 <= self.min_p < 1:
            raise bad("min-p", "in [0, 1)", self.min_p)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition-penalty", "finite and > 0", self.repetition_penalty)
        if not math.isfinite(self.presence_penalty):
            raise bad("presence-penalty", "finite", self.presence_penalty)
        if not math.isfinite(self.frequency_penalty):
            raise bad("frequency-penalty", "finite", self.frequency_penalty)
        if self.no_repeat_ngram_size < 0:
            raise bad("no-repeat-ngram-size", ">= 0", self.no_repeat_ngram_size)


def _scatter_ids(history: jnp.ndarray, use: jnp.ndarray, vocab: int) -> jnp.ndarray:
    """history [B, L] -> ids [B, L] with unused or out-of-vocabulary entries sent to the spare
    column ``vocab`` (cut off after the scatter; transformers clamps out-of-range ids the same
    way). Negative ids must not reach a scatter: they would wrap around to the end."""
    in_vocab = (history >= 0) & (history < vocab)
    return jnp.where(use & in_vocab, history, vocab)


def token_counts(history: jnp.ndarray, valid: jnp.ndarray, vocab: int) -> jnp.ndarray:
    """How often each token occurs in the valid part of each row: [B, L], [B, L] -> [B, V]
    int32. One scatter-add, never a [B, L, V] one-hot."""
    B = history.shape[0]
    ids = _scatter_ids(history, valid, vocab)
    counts = jnp.zeros((B, vocab + 1), jnp.int32).at[jnp.arange(B)[:, None], ids].add(1)
    return counts[:, :vocab]


def no_repeat_ngram_mask(history: jnp.ndarray, valid: jnp.ndarray, n: int,
                         vocab: int) -> jnp.ndarray:
    """Tokens that would complete an n-gram already in the history: [B, L], [B, L] -> [B, V]
    bool. As transformers: the last N-1 valid tokens are the prefix; every window of N tokens
    inside the valid run whose first N-1 tokens equal the prefix bans its last token (N = 1 bans
    every token of the history). Vectorized over L; the only Python loop is over N."""
    B, L = history.shape
    if n > L:
        return jnp.zeros((B, vocab), bool)
    W = L - n + 1  # window starts
    start = jnp.argmax(valid, axis=1)
    end = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # one past the last valid token
    # The run is contiguous, so a window lies inside it iff its first and last tokens do; a row
    # with such a window has >= N valid tokens, so its prefix is inside the run too.
    match = valid[:, :W] & valid[:, n - 1:]
    for i in range(n - 1):
        pos = jnp.clip(end - (n - 1) + i, 0, L - 1)
        prefix_tok = jnp.take_along_axis(history, pos[:, None], axis=1)  # [B, 1]
        match = match & (history[:, i:i + W] == prefix_tok)
    ids = _scatter_ids(history[:, n - 1:], match, vocab)
    banned = jnp.zeros((B, vocab + 1), bool).at[jnp.arange(B)[:, None], ids].set(True)
    return banned[:, :vocab]


def _top_k(logits: jnp.ndarray, k: int) -> jnp.ndarray:
    # As TopKLogitsWarper: drop what is below the k-th largest value, so ties with it stay.
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    # As TopPLogitsWarper, computed the same way for the same float rounding: sort ascending,
    # drop the tokens whose cumulative probability is <= 1 - top_p, always keep the most probable.
    # The dropped tokens are a prefix of the sorted order, so a threshold on the logit replaces
    # transformers' scatter back to vocabulary order (ties with the smallest kept logit all stay;
    # transformers' unstable sort keeps an arbitrary subset of them).
    V = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    n_drop = jnp.minimum(jnp.sum(cum <= 1 - top_p, axis=-1), V - 1)
    cutoff = jnp.take_along_axis(sorted_logits, n_drop[:, None], axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _min_p(logits: jnp.ndarray, min_p: float) -> jnp.ndarray:
    # As MinPLogitsWarper: drop tokens whose probability is below min_p times the top one's.
    # min_p < 1, so the most probable token always passes (transformers' min_tokens_to_keep=1).
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, -jnp.inf, logits)


def process_logits(logits: jnp.ndarray, history: jnp.ndarray, valid: jnp.ndarray,
                   params: SamplingParams) -> jnp.ndarray:
    """logits [B, V] float32 for the next token; history [B, L] int32, the row's tokens so far
    (prompt then generated) at the positions where valid [B, L] bool is True (one contiguous
    run per row: left padding before it, unwritten slots after it) -> processed logits [B, V]
    float32, excluded tokens at -inf. Order as transformers' generate: repetition penalty,
    no-repeat n-gram, presence/frequency penalties (OpenAI's formula; transformers has none),
    then, only when not greedy, temperature, top-k, top-p, min-p."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    p = params
    if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        counts = token_counts(history, valid, V)
        present = counts > 0
    if p.repetition_penalty != 1.0:
        penalized = jnp.where(logits < 0, logits * p.repetition_penalty,
                              logits / p.repetition_penalty)
        logits = jnp.where(present, penalized, logits)
    if p.no_repeat_ngram_size > 0:
        banned = no_repeat_ngram_mask(history, valid, p.no_repeat_ngram_size, V)
        logits = jnp.where(banned, -jnp.inf, logits)
    if p.frequency_penalty != 0.0:
        logits = logits - p.frequency_penalty * counts.astype(jnp.float32)
    if p.presence_penalty != 0.0:
        logits = logits - p.presence_penalty * present.astype(jnp.float32)
    if p.greedy:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if 0 < p.top_k < V:  # transformers clamps k to V, which drops nothing
        logits = _top_k(logits, p.top_k)
    if p.top_p < 1.0:
        logits = _top_p(logits, p.top_p)
    if p.min_p > 0.0:
        logits = _min_p(logits, p.min_p)
    return logits


def sample_token(logits: jnp.ndarray, key: jax.Array, params: SamplingParams,
                 history: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """logits [B, V], history and valid [B, L] as in ``process_logits`` -> next tokens [B]
    int32: the argmax of the processed logits when ``params.greedy``, else a draw from them."""
    logits = process_logits(logits, history, valid, params)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def stop_mask(stop_tokens: Sequence[int], vocab: int) -> jnp.ndarray:
    """The stop tokens as a [V] bool mask: one shape whatever their number (no recompile)."""
    return jnp.zeros((vocab,), bool).at[jnp.asarray(list(stop_tokens), jnp.int32)].set(True)


def check_token_ids(prompts: Sequence[Sequence[int]], stop_tokens: Sequence[int],
                    vocab: int) -> None:
    """A UserError (one line) for a prompt token or a stop token outside [0, vocab)."""
    for t in stop_tokens:
        if not 0 <= t < vocab:
            raise UserError(f"stop token {t} is outside the vocabulary [0, {vocab})")
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise UserError(f"a prompt token is outside the vocabulary [0, {vocab})")
