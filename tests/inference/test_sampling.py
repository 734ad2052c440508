"""KV-cache decoding against the full forward pass; top-k / top-p filtering against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.inference.sampling import Generator, SamplingParams, filter_logits
from jaxformer.models import DecoderLM


def make_model(pos_encoding="learned"):
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_len=40,
                      pos_encoding=pos_encoding)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_kv_cache_decoding_equals_full_forward():
    for pos_encoding in ("learned", "sinusoidal"):
        model = make_model(pos_encoding)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 20)))
        full = np.asarray(model(tokens, jnp.broadcast_to(jnp.arange(20), (2, 20))))
        cache = model.init_cache(2, 20)
        # A 7-token prompt, then one token at a time.
        logits, cache = model.decode(tokens[:, :7], cache, jnp.asarray(0))
        steps = [np.asarray(logits)]
        for i in range(7, 20):
            logits, cache = model.decode(tokens[:, i:i + 1], cache, jnp.asarray(i))
            steps.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_greedy_generation_follows_argmax_of_full_forward():
    model = make_model()
    graphdef, params = nnx.split(model)
    gen = Generator(graphdef, nnx.to_pure_dict(params), max_len=40)
    prompt = [3, 14, 15, 9]
    new = gen.generate(prompt, 10, SamplingParams(temperature=0.0))
    seq = list(prompt)
    for _ in range(10):
        t = jnp.asarray([seq])
        logits = model(t, jnp.arange(len(seq))[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert new == seq[len(prompt):]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    def kept(top_k, top_p):
        out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
        return np.isfinite(out[0]).tolist()
    assert kept(2, 1.0) == [True, True, False, False, False]
    # Smallest set reaching 0.8: 0.5 + 0.2 + 0.15 = 0.85 (0.7 is not enough).
    assert kept(0, 0.8) == [True, True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False, False]
    assert kept(0, 1.0) == [True] * 5


def test_sampling_frequencies_follow_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    from jaxformer.inference.sampling import sample_token
    draws = jax.vmap(lambda k: sample_token(logits, k, SamplingParams(1.0, 2, 1.0)))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0.0], atol=0.03)
