"""Logits processors against transformers' own processor classes on the same logits (the
presence/frequency penalties, which transformers lacks, against OpenAI's formula in numpy),
sampling frequencies against the processed distribution, and SamplingParams.check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxformer.errors import UserError
from jaxformer.inference.processors import SamplingParams, process_logits, sample_token

B, V, L = 3, 50, 24
# (left padding, valid length) per row; the slots after the run are unwritten.
RUNS = [(0, 21), (5, 14), (11, 7)]


def make_batch(seed: int = 0):
    """Seeded logits [B, V] with both signs, and histories [B, L] whose padding and unwritten
    slots hold random ids (so a leak would change the result). Rows repeat a chunk of a small
    alphabet, so their n-grams repeat and the trailing prefix occurs earlier."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (B, V)).astype(np.float32)
    history = rng.integers(0, V, (B, L)).astype(np.int32)
    valid = np.zeros((B, L), bool)
    for b, (pad, n) in enumerate(RUNS):
        base = rng.integers(0, 8, n // 2 + 2)
        row = np.concatenate([base, base])[:n]
        history[b, pad:pad + n] = row
        valid[b, pad:pad + n] = True
    return logits, history, valid


def presence_frequency_np(logits, history, valid, presence, frequency):
    """OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence."""
    out = logits.copy()
    for b in range(len(logits)):
        c = np.bincount(history[b][valid[b]], minlength=V).astype(np.float32)
        out[b] = out[b] - c * frequency - (c > 0).astype(np.float32) * presence
    return out


def reference(logits, history, valid, p: SamplingParams):
    """transformers' processors in generate's order, one row at a time on the valid tokens."""
    processors, warpers = [], []
    if p.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if not p.greedy:
        if p.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            warpers.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0.0:
            warpers.append(MinPLogitsWarper(p.min_p))
    out = np.empty_like(logits)
    for b in range(logits.shape[0]):
        ids = torch.from_numpy(history[b][valid[b]].astype(np.int64))[None]
        scores = torch.from_numpy(logits[b:b + 1].copy())
        for proc in processors:
            scores = proc(ids, scores)
        row = presence_frequency_np(scores.numpy(), history[b:b + 1], valid[b:b + 1],
                                    p.presence_penalty, p.frequency_penalty)
        scores = torch.from_numpy(row)
        for proc in warpers:
            scores = proc(ids, scores)
        out[b] = scores.numpy()[0]
    return out


def assert_same(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-6)


CASES = {
    "repetition_up": SamplingParams(temperature=0.0, repetition_penalty=1.3),
    "repetition_down": SamplingParams(temperature=0.0, repetition_penalty=0.7),
    "ngram1": SamplingParams(temperature=0.0, no_repeat_ngram_size=1),
    "ngram2": SamplingParams(temperature=0.0, no_repeat_ngram_size=2),
    "ngram3": SamplingParams(temperature=0.0, no_repeat_ngram_size=3),
    "ngram8": SamplingParams(temperature=0.0, no_repeat_ngram_size=8),  # row 2 has 7 tokens
    "presence": SamplingParams(temperature=0.0, presence_penalty=0.6),
    "frequency": SamplingParams(temperature=0.0, frequency_penalty=0.4),
    "temperature": SamplingParams(temperature=0.7),
    "top_k1": SamplingParams(temperature=1.0, top_k=1),
    "top_k5": SamplingParams(temperature=1.0, top_k=5),
    "top_k_above_vocab": SamplingParams(temperature=1.0, top_k=60),
    "top_p03": SamplingParams(temperature=1.0, top_p=0.3),
    "top_p09": SamplingParams(temperature=1.0, top_p=0.9),
    "top_p_tiny": SamplingParams(temperature=1.0, top_p=1e-4),
    "min_p005": SamplingParams(temperature=1.0, min_p=0.05),
    "min_p02": SamplingParams(temperature=1.0, min_p=0.2),
    "greedy_ignores_warpers": SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3,
                                             repetition_penalty=1.2),
    "all": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02,
                          repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2,
                          no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name):
    p = CASES[name]
    logits, history, valid = make_batch()
    ours = process_logits(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(valid), p)
    ref = reference(logits, history, valid, p)
    assert_same(ours, ref)
    # Each case must change something, or it tests nothing (top-k >= V is a no-op, as in
    # transformers); the n-gram cases must ban tokens in row 0 (whose trailing n-1 tokens occur
    # earlier for every n <= 10) and none in rows too short to hold an n-gram.
    assert (name == "top_k_above_vocab") == np.array_equal(np.asarray(ours), logits)
    if name.startswith("ngram"):
        n_banned = np.isneginf(np.asarray(ours)).sum(axis=1)
        long_enough = np.array([n >= p.no_repeat_ngram_size for _, n in RUNS])
        assert n_banned[0] >= 1 and (n_banned[~long_enough] == 0).all()


def test_jit_matches_eager_and_defaults_trace_to_nothing():
    logits, history, valid = make_batch(1)
    p = CASES["all"]
    jitted = jax.jit(process_logits, static_argnums=3)
    args = (jnp.asarray(logits), jnp.asarray(history), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(jitted(*args, p)),
                                  np.asarray(process_logits(*args, p)))
    for plain in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
        jaxpr = jax.make_jaxpr(lambda lg, h, v, plain=plain: process_logits(lg, h, v, plain))(
            *args)
        assert not jaxpr.jaxpr.eqns, jaxpr


def test_greedy_sample_is_argmax_of_processed():
    logits, history, valid = make_batch(2)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5, no_repeat_ngram_size=2)
    args = (jnp.asarray(history), jnp.asarray(valid))
    tokens = sample_token(jnp.asarray(logits), jax.random.key(0), p, *args)
    assert tokens.dtype == jnp.int32 and tokens.shape == (B,)
    np.testing.assert_array_equal(np.asarray(tokens),
                                  reference(logits, history, valid, p).argmax(axis=1))


def test_sampling_frequencies_follow_processed_distribution():
    logits, history, valid = make_batch(3)
    logits = logits / 3  # flatter, so several tokens survive the filters
    p = SamplingParams(temperature=0.9, top_k=12, top_p=0.95, min_p=0.05,
                       repetition_penalty=1.3, no_repeat_ngram_size=2)
    args = (jnp.asarray(history), jnp.asarray(valid))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits), k, p, *args)))(keys)
    draws = np.asarray(draws)  # [4000, B]
    probs = np.asarray(jax.nn.softmax(process_logits(jnp.asarray(logits), *args, p), axis=-1))
    for b in range(B):
        freq = np.bincount(draws[:, b], minlength=V) / len(draws)
        assert (probs[b] > 0.02).sum() >= 3  # a real distribution, not a near-argmax
        np.testing.assert_array_equal(freq[probs[b] == 0], 0)  # excluded: never drawn
        np.testing.assert_allclose(freq, probs[b], atol=0.03)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=float("inf")), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=-1), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(min_p=-0.1), "--min-p"),
    (dict(min_p=1.0), "--min-p"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
    (dict(repetition_penalty=float("inf")), "--repetition-penalty"),
    (dict(presence_penalty=float("nan")), "--presence-penalty"),
    (dict(frequency_penalty=float("-inf")), "--frequency-penalty"),
    (dict(no_repeat_ngram_size=-2), "--no-repeat-ngram-size"),
])
def test_check_rejects_out_of_range(kwargs, flag):
    with pytest.raises(UserError, match=f"^{flag} must be .*, got ") as err:
        SamplingParams(**kwargs).check()
    assert "\n" not in str(err.value)


def test_check_accepts_edges():
    SamplingParams().check()
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=0.5,
                   presence_penalty=-2.0, frequency_penalty=2.0, no_repeat_ngram_size=0).check()
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
