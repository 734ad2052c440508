"""KV-cache decoding against the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
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


def test_rows_at_different_slots_equal_rows_decoded_alone():
    """A [B] cache index (continuous batching: each row at its own slot) gives each row the
    logits and cache it gets decoded alone with a scalar index (RoPE + GQA, and MLA)."""
    from jaxformer.models import presets
    from tests.nn.test_mla import mla_config

    cfgs = [presets.llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=61,
                          max_len=40), mla_config()]
    decode = nnx.jit(lambda m, tokens, cache, index: m.decode(tokens, cache, index))
    for cfg in cfgs:
        model = DecoderLM(cfg, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(1)
        lengths = [5, 9]
        alone = []
        for n in lengths:
            cache = model.init_cache(1, 16)
            _, cache = decode(model, jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n))),
                              cache, jnp.asarray(0))
            alone.append(cache)
        batched = jax.tree.map(lambda *xs: jnp.concatenate(xs), *alone)
        token = jnp.asarray([[7], [11]])
        logits, new = decode(model, token, batched, jnp.asarray(lengths))
        for r, n in enumerate(lengths):
            want, want_cache = decode(model, token[r:r + 1], alone[r], jnp.asarray(n))
            np.testing.assert_allclose(logits[r:r + 1], want, atol=1e-5)
            for got_layer, want_layer in zip(new, want_cache, strict=True):
                for key in got_layer:
                    np.testing.assert_allclose(got_layer[key][r:r + 1], want_layer[key],
                                               atol=1e-6)
