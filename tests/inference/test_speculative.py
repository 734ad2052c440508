"""Speculative decoding against the target alone: greedy output equal to ``Generator``'s (a
random draft that is always rejected, a perturbed copy of the target that is accepted about
half the time, the target as its own draft, always accepted; history-dependent processors;
stop tokens); sampled continuations against the target's exact distribution from its full
forward pass (chi-square, with the draft's own distribution as the control that must fail);
bad input. Few compilations: every greedy case runs one compiled loop (the drafts share the
target's architecture, only their parameters differ)."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import chisquare

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily, Seq2SeqFamily
from jaxformer.inference.generate import Generator
from jaxformer.inference.processors import SamplingParams, process_logits
from jaxformer.inference.speculative import (
    SpeculativeStats,
    speculative_generate,
    speculative_loop,
    stop_mask,
)
from jaxformer.models import build_model, presets

PROMPT = [5, 1, 7, 2]
N, K = 12, 4


@functools.cache
def build(arch: str, seed: int, layers: int, vocab: int, max_len: int, init_std: float
          ) -> tuple[DecoderFamily, nnx.State]:
    """A tiny random decoder (a large init_std makes its tokens depend on every weight)."""
    m = build_model(presets.preset(arch, n_layers=layers, d_model=32, n_heads=4,
                                   vocab_size=vocab, max_len=max_len, init_std=init_std),
                    nnx.Rngs(seed))
    graphdef, params = nnx.split(m)
    return DecoderFamily(m.cfg, graphdef), params


def target() -> tuple[DecoderFamily, nnx.State]:
    return build("llama", 1, 2, 40, 24, 0.5)


def draft_params(name: str) -> nnx.State:
    """Parameters for the target's architecture: its own, a copy with every weight moved by
    N(0, 0.01^2) (this model is so sensitive that its argmax then differs about half the
    time), or another random initialization."""
    _, params = target()
    if name == "self":
        return params
    if name == "perturbed":
        rng = np.random.default_rng(0)
        return jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32),
                            params)
    return build("llama", 2, 2, 40, 24, 0.5)[1]


# Greedy with history-dependent processors: the draft's and the target's argmax at each
# position depend on the tokens before it, draft tokens included. (They change the target's
# greedy tokens from the 6th on here, so the comparison covers them.)
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.5, no_repeat_ngram_size=2)


@functools.cache
def target_greedy() -> list[int]:
    fam, params = target()
    return Generator(fam, params).generate([PROMPT], N, GREEDY)[0].tokens


@pytest.mark.parametrize("draft", ["random", "perturbed", "self"])
def test_greedy_output_is_the_targets(draft):
    fam, tparams = target()
    dparams = draft_params(draft)
    want = target_greedy()
    got, stats = speculative_generate(fam, tparams, fam, dparams, PROMPT,
                                      max_new_tokens=N, k=K, sampling=GREEDY)
    print(f"{draft}: acceptance {stats.acceptance_rate:.3f}, "
          f"{stats.tokens_per_target_call:.2f} tokens per target call")
    assert got == want
    assert stats.proposed == stats.rounds * K and stats.rounds >= 1
    if draft == "self":  # every token accepted, k + 1 per target call
        assert stats.acceptance_rate == 1.0
        assert stats.tokens_per_target_call == K + 1
        assert stats.rounds == -(-(N - 1) // (K + 1))  # the prefill gives the first token
    elif draft == "perturbed":  # rounds that keep some draft tokens and reject the rest
        assert 0.2 < stats.acceptance_rate < 0.8
    else:  # the rejection path decided almost every token
        assert stats.acceptance_rate < 0.2

    # Stop tokens: the output is cut before the first one, as the target alone cuts it
    # (test_generate checks that Generator does); a stop token that never comes is harmless.
    unused = next(t for t in range(40) if t not in want)
    for stops in ([want[6], unused], [want[0]], [want[-1]]):
        got, _ = speculative_generate(fam, tparams, fam, dparams, PROMPT, max_new_tokens=N,
                                      k=K, sampling=GREEDY, stop_tokens=stops)
        assert got == want[:min(want.index(s) for s in stops if s in want)]


# --- the sampled distribution ------------------------------------------------------------

V, NEW, SAMPLES = 4, 4, 12_000
DIST_PROMPT = [1, 3, 1]
# k=2 over 4 new tokens: the first from the prefill, then d_1 and d_2 accepted or replaced by
# a residual draw, the bonus token after two acceptances, and a second round otherwise.
DIST_K = 2
# Every warper, and history-dependent penalties (the draft tokens before a position count;
# the additive presence penalty is the one that matters with these small logits: computing
# the target's penalties without the draft tokens gave p = 0.0 here, without it p = 0.82).
SAMPLING = SamplingParams(temperature=0.8, top_k=3, top_p=0.95, repetition_penalty=1.4,
                          presence_penalty=1.0)
CONTINUATIONS = np.asarray(list(itertools.product(range(V), repeat=NEW)), np.int32)  # [V^4, 4]


def dist_model(name: str) -> tuple[DecoderFamily, nnx.State]:
    """The target a Llama, the draft a GPT-2 (another architecture: learned positions,
    biases, another cache shape), one layer each (compile time), with a mild init so that no
    distribution is nearly one-hot."""
    if name == "target":
        return build("llama", 1, 1, V, 8, 0.1)
    return build("gpt2", 2, 1, V, 8, 0.1)


def exact_joint(name: str) -> np.ndarray:
    """The probability of each of the V^4 continuations of DIST_PROMPT under a model's full
    (uncached) forward pass: the product of each token's processed distribution given the
    tokens before it -> [V^4]."""
    fam, params = dist_model(name)
    P = len(DIST_PROMPT)
    seqs = jnp.asarray(np.concatenate(
        [np.tile(DIST_PROMPT, (len(CONTINUATIONS), 1)), CONTINUATIONS], axis=1))

    @jax.jit
    def joint(params):
        pos = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
        logits = nnx.merge(fam.graphdef, params)(seqs, pos)
        logp = jnp.zeros(len(CONTINUATIONS))
        for i in range(NEW):
            valid = jnp.broadcast_to(jnp.arange(seqs.shape[1]) < P + i, seqs.shape)
            logits_i = process_logits(logits[:, P + i - 1], seqs, valid, SAMPLING)
            probs = jax.nn.softmax(logits_i)
            logp = logp + jnp.log(probs[jnp.arange(len(seqs)), seqs[:, P + i]])
        return jnp.exp(logp)

    return np.asarray(joint(params), np.float64)


def p_value(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of samples [S, NEW] to probs [V^NEW] (the cells expected
    below 5 pooled into one, those of probability 0 left out); 0 when a sample has
    probability 0 (top-k and top-p exclude tokens)."""
    counts = np.bincount(samples @ (V ** np.arange(NEW - 1, -1, -1)), minlength=V ** NEW)
    if counts[probs == 0].any():
        return 0.0
    expected = probs / probs.sum() * len(samples)
    big, small = expected >= 5, (expected > 0) & (expected < 5)
    obs, exp = counts[big], expected[big]
    if small.any():
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    return float(chisquare(obs, exp).pvalue)


def test_sampled_continuations_have_the_targets_distribution():
    target, tparams = dist_model("target")
    draft, dparams = dist_model("draft")

    @jax.jit
    def sample(tparams, dparams, keys):
        def one(key):
            return speculative_loop(target, tparams, draft, dparams, jnp.asarray(DIST_PROMPT),
                                    key, stop_mask([], V), max_new_tokens=NEW, k=DIST_K,
                                    sampling=SAMPLING)
        return jax.vmap(one)(keys)

    new, count, rounds, accepted = sample(tparams, dparams,
                                          jax.random.split(jax.random.key(0), SAMPLES))
    assert (np.asarray(count) >= NEW).all()
    samples = np.asarray(new)[:, :NEW]
    p_target, p_draft = exact_joint("target"), exact_joint("draft")
    rounds = int(rounds.sum())
    stats = SpeculativeStats(rounds=rounds, proposed=rounds * DIST_K,
                             accepted=int(accepted.sum()))
    # Both paths ran thousands of times: acceptances and residual draws.
    assert 0.2 < stats.acceptance_rate < 0.8

    p_spec = p_value(samples, p_target)
    rng = np.random.default_rng(0)
    from_draft = CONTINUATIONS[rng.choice(len(p_draft), SAMPLES, p=p_draft / p_draft.sum())]
    p_control = p_value(from_draft, p_target)
    print(f"acceptance {stats.acceptance_rate:.3f}, chi-square p {p_spec:.4f} (speculative) "
          f"vs {p_control:.2e} (samples of the draft)")
    assert p_spec > 1e-3
    assert p_control < 1e-6


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_is_a_user_error():
    fam, params = target()
    # Checked before any parameter is used: families with other configs suffice.
    other = DecoderFamily(dataclasses.replace(fam.cfg, vocab_size=41), fam.graphdef)
    short = DecoderFamily(dataclasses.replace(fam.cfg, max_len=16), fam.graphdef)
    seq2seq = Seq2SeqFamily(fam.cfg, fam.graphdef, decoder_start_id=0)

    def run(draft=fam, prompt=PROMPT, **kw):
        kw = {"max_new_tokens": N, "k": 4, **kw}
        return speculative_generate(fam, params, draft, params, prompt, **kw)

    with pytest.raises(UserError, match=r"the draft's vocabulary \(41\) differs from the "
                                        r"target's \(40\)"):
        run(other)
    with pytest.raises(UserError, match="k .* at least 1, got 0"):
        run(k=0)
    # 4 + 17 + 4 - 1 = 24 fits the target's 24 slots (its own loop needs only 21); 25 does not.
    with pytest.raises(UserError, match=r"= 25 exceeds the target's context \(model.max_len 24"):
        run(max_new_tokens=18)
    with pytest.raises(UserError, match=r"= 19 exceeds the draft's context \(model.max_len 16"):
        run(short, max_new_tokens=12, k=4)
    with pytest.raises(UserError, match="max_new_tokens must be at least 1"):
        run(max_new_tokens=0)
    with pytest.raises(UserError, match="at least one token"):
        run(prompt=[])
    with pytest.raises(UserError, match="outside the vocabulary"):
        run(prompt=[3, 40])
    with pytest.raises(UserError, match="stop token 40"):
        run(stop_tokens=[40])
    with pytest.raises(UserError, match="--temperature"):
        run(sampling=SamplingParams(temperature=-1.0))
    with pytest.raises(UserError, match="decoder-only"):
        run(seq2seq)
