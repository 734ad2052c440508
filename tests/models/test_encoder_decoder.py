"""EncoderDecoderLM: cached decoding, packing isolation, decoder causality (2017 Transformer:
post-LN, sinusoidal positions, ReLU, sqrt(d)-scaled tied embeddings; and T5 v1.0 for the
relative-bias paths)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.models import ARCHITECTURES, build_model, presets
from jaxformer.models.encoder_decoder import EncoderDecoderLM

VOCAB = 50
TOL = 1e-5


@functools.cache
def make_model(family: str = "transformer_2017") -> EncoderDecoderLM:
    """One model per family for the whole module (the tests only read it). Dropout is
    configured, so the tests also show that no dropout_rng means deterministic."""
    cfg = presets.preset(family, n_layers=2, n_decoder_layers=3, d_model=32, n_heads=4,
                         vocab_size=VOCAB, max_len=64, init_std=0.3, dropout=0.1)
    model = build_model(cfg, nnx.Rngs(0))
    assert isinstance(model, EncoderDecoderLM)
    return model


@nnx.jit
def forward(model, *args):
    return model(*args)


@nnx.jit
def encode(model, enc, enc_seg):
    return model.encode(enc, enc_seg)


@nnx.jit
def decode(model, dec, memory, enc_seg, cache, index):
    return model.decode(dec, memory, enc_seg, cache, index)


def tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, shape), jnp.int32)


def test_registered_and_2017_layout():
    assert ARCHITECTURES["encoder_decoder"] is EncoderDecoderLM
    model = make_model()
    assert len(model.encoder) == 2 and len(model.decoder) == 3
    assert model.enc_norm is None and model.dec_norm is None  # post-LN: no final norms
    assert model.unembed.lm_head is None  # tied to the one shared table
    assert model.decoder[0].cross_attn is not None and model.encoder[0].cross_attn is None


@pytest.mark.parametrize("family", ["transformer_2017", "t5_v1_0"])
def test_cached_decode_matches_full_forward(family):
    model = make_model(family)
    b, s, t = 2, 7, 8
    enc = tokens((b, s), 0)
    enc_seg = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)  # row 1: source padding
    dec = tokens((b, t), 1)
    full = forward(model, enc, dec, enc_seg, jnp.ones_like(dec))
    assert full.shape == (b, t, VOCAB) and full.dtype == jnp.float32

    memory = encode(model, enc, enc_seg)
    cache = model.init_cache(b, t)
    prompt = 3  # a 3-token prefix in one call, then one token at a time
    logits, cache = decode(model, dec[:, :prompt], memory, enc_seg, cache, jnp.asarray(0))
    steps = [logits]
    for i in range(prompt, t):
        logits, cache = decode(model, dec[:, i:i + 1], memory, enc_seg, cache, jnp.asarray(i))
        steps.append(logits)
    stepped = jnp.concatenate(steps, axis=1)
    assert float(jnp.abs(full).max()) > 0.5
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["transformer_2017", "t5_v1_0"])
def test_packed_examples_match_separate_runs(family):
    model = make_model(family)
    enc_a, dec_a = tokens((1, 5), 2), tokens((1, 4), 3)
    enc_b, dec_b = tokens((1, 6), 4), tokens((1, 5), 5)

    width = 13  # both examples and 2 padding slots

    def row(parts):
        """[(ids [1, L], segment id)] -> ids, segment ids, positions [1, width], right-padded."""
        ids = jnp.concatenate([x for x, _ in parts], axis=1)
        seg = sum(([i] * x.shape[1] for x, i in parts), [])
        pos = sum((list(range(x.shape[1])) for x, _ in parts), [])
        pad = width - ids.shape[1]
        return (jnp.pad(ids, ((0, 0), (0, pad))), jnp.asarray([seg + [0] * pad], jnp.int32),
                jnp.asarray([pos + [0] * pad], jnp.int32))

    def stack(*rows):
        return [jnp.concatenate(x, axis=0) for x in zip(*rows, strict=True)]

    # Row 0: a and b packed; row 1: a alone; row 2: b alone (all the same width: one compile).
    enc, enc_seg, enc_pos = stack(row([(enc_a, 1), (enc_b, 2)]), row([(enc_a, 1)]),
                                  row([(enc_b, 1)]))
    dec, dec_seg, dec_pos = stack(row([(dec_a, 1), (dec_b, 2)]), row([(dec_a, 1)]),
                                  row([(dec_b, 1)]))
    out = np.asarray(forward(model, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos))
    assert np.abs(out[1, :4]).max() > 0.5
    np.testing.assert_allclose(out[0, :4], out[1, :4], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[0, 4:9], out[2, :5], atol=TOL, rtol=0)
    # And the packing matters: without its segment ids, b's tokens see a's.
    ones = (enc_seg != 0).astype(jnp.int32), (dec_seg != 0).astype(jnp.int32)
    unpacked = np.asarray(forward(model, enc, dec, *ones, enc_pos, dec_pos))
    assert np.abs(unpacked[0, 4:9] - out[2, :5]).max() > 1e-2


def test_decoder_is_causal_and_sees_the_encoder():
    model = make_model()
    enc, dec = tokens((2, 6), 6), tokens((2, 8), 7)
    base = forward(model, enc, dec)
    changed = forward(model, enc, dec.at[:, 5].set((dec[:, 5] + 1) % VOCAB))
    np.testing.assert_allclose(np.asarray(changed[:, :5]), np.asarray(base[:, :5]), atol=TOL,
                               rtol=0)
    assert float(jnp.abs(changed[:, 5:] - base[:, 5:]).max()) > 1e-2
    # Every decoder position depends on the source, the last one included.
    other_source = forward(model, enc.at[:, -1].set((enc[:, -1] + 1) % VOCAB), dec)
    assert float(jnp.abs(other_source - base).max(axis=(0, 2)).min()) > 1e-3
