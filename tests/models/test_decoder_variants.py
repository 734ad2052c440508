"""The decoder-only model under every block choice: cache decoding equals the full forward,
no future or other-document token leaks in, GQA/MQA are what their definitions say, the
prefix-LM mask and dropout behave, and a Llama-style model learns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import DecoderLM, presets
from jaxformer.models.decoder import prefix_mask
from jaxformer.nn.attention import Attention
from jaxformer.nn.masks import prefix_lm_mask

BASE = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_len=32)
VARIANTS = {
    "gpt2": presets.gpt2(**BASE),
    "llama_gqa": presets.llama(**BASE, n_kv_heads=2),
    "mqa": presets.llama(**BASE, n_kv_heads=1),
    "mistral_window": presets.mistral(**BASE, sliding_window=3),
    "alibi_post_ln": presets.gpt2(**BASE, pos_encoding="alibi", norm_position="post"),
    "t5_bias_geglu": presets.gpt2(**BASE, pos_encoding="t5_relative", activation="geglu",
                                  relative_buckets=8, relative_max_distance=16),
    "shaw_scalenorm": presets.gpt2(**BASE, pos_encoding="shaw", norm="scalenorm",
                                   relative_max_distance=5),
    "sinusoidal_relu": presets.gpt2(**BASE, pos_encoding="sinusoidal", activation="relu",
                                    embed_scale=True, use_bias=False),
    "nope_partial_head_dim": presets.llama(**BASE, pos_encoding="none", head_dim=16),
    "rope_partial": presets.llama(**BASE, rope_fraction=0.5, rope_theta=100.0),
}


def model_of(cfg: ModelConfig, seed: int = 0) -> DecoderLM:
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def tokens(b: int, t: int, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, (b, t)), jnp.int32)


def arange_positions(b: int, t: int) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(t), (b, t))


@pytest.mark.parametrize("name", VARIANTS)
def test_cache_decoding_equals_full_forward(name):
    model = model_of(VARIANTS[name])
    ids = tokens(2, 10)
    full = model(ids, arange_positions(2, 10))
    cache = model.init_cache(2, 10)
    logits, cache = model.decode(ids[:, :4], cache, jnp.asarray(0))
    steps = [logits]
    for i in range(4, 10):
        logits, cache = model.decode(ids[:, i:i + 1], cache, jnp.asarray(i))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)
    assert float(jnp.abs(full).std()) > 1e-3  # the model is not a constant


@pytest.mark.parametrize("name", VARIANTS)
def test_no_future_token_and_no_other_document_leaks(name):
    model = model_of(VARIANTS[name])
    ids = tokens(1, 12)
    pos = arange_positions(1, 12)
    base = model(ids, pos)
    changed = model(ids.at[0, 7].set((ids[0, 7] + 1) % 61), pos)
    np.testing.assert_allclose(changed[0, :7], base[0, :7], atol=1e-6)
    assert float(jnp.abs(changed[0, 7:] - base[0, 7:]).max()) > 1e-4
    # Two documents packed in one row compute what each computes alone.
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    packed_pos = jnp.asarray([list(range(5)) + list(range(7))])
    packed = model(ids, packed_pos, seg)
    alone = model(ids[:, 5:], arange_positions(1, 7))
    np.testing.assert_allclose(packed[0, 5:], alone[0], atol=2e-5)


def naive_attention(x, w_q, w_k, w_v, w_out, kv_of_head):
    """float64 causal attention where query head n reads key/value head kv_of_head[n]."""
    t = x.shape[0]
    out = np.zeros((t, x.shape[1]))
    for n in range(w_q.shape[1]):
        q, k, v = x @ w_q[:, n], x @ w_k[:, kv_of_head[n]], x @ w_v[:, kv_of_head[n]]
        s = q @ k.T / np.sqrt(q.shape[-1]) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        out += (p / p.sum(-1, keepdims=True)) @ v @ w_out[n]
    return out


@pytest.mark.parametrize(("n_kv", "kind"), [(4, "MHA"), (2, "GQA"), (1, "MQA")])
def test_grouped_query_attention_is_its_definition(n_kv, kind):
    """K = N is multi-head attention, K = 1 multi-query (every head shares one key/value
    head), and in between query head n reads key/value head n // (N / K)."""
    attn = Attention(16, 4, n_kv_heads=n_kv, use_bias=False, init_std=0.3, rngs=nnx.Rngs(1))
    x = np.random.default_rng(2).normal(size=(1, 6, 16))
    got, _ = attn(jnp.asarray(x, jnp.float32), is_causal=True)
    w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("w_q", "w_k", "w_v",
                                                                    "w_out")}
    kv_of_head = {"MHA": [0, 1, 2, 3], "GQA": [0, 0, 1, 1], "MQA": [0, 0, 0, 0]}[kind]
    want = naive_attention(x[0], w["w_q"], w["w_k"], w["w_v"], w["w_out"], kv_of_head)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4)
    assert w["w_k"].shape == (16, n_kv, 4)


def test_prefix_lm_sees_the_whole_prefix_and_only_the_past_after_it():
    model = model_of(VARIANTS["llama_gqa"])
    ids, pos = tokens(1, 10), arange_positions(1, 10)
    prefix = (jnp.arange(10) < 4)[None].astype(jnp.int32)
    np.testing.assert_array_equal(prefix_mask(prefix)[0, 0],
                                  prefix_lm_mask(jnp.asarray([4]), 10)[0, 0])
    base = model(ids, pos, prefix=prefix)
    in_prefix = model(ids.at[0, 3].set((ids[0, 3] + 1) % 61), pos, prefix=prefix)
    assert float(jnp.abs(in_prefix[0, 0] - base[0, 0]).max()) > 1e-4  # token 0 sees token 3
    after = model(ids.at[0, 7].set((ids[0, 7] + 1) % 61), pos, prefix=prefix)
    np.testing.assert_allclose(after[0, :7], base[0, :7], atol=1e-6)  # still causal after it
    # A prefix of length 0 or 1 is the causal model.
    one = (jnp.arange(10) < 1)[None].astype(jnp.int32)
    np.testing.assert_allclose(model(ids, pos, prefix=one), model(ids, pos), atol=1e-6)
    # Two packed documents, each with its own prefix: document 2 does not see document 1.
    seg = jnp.asarray([[1] * 4 + [2] * 6])
    two = jnp.asarray([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0]])
    packed = model(ids, jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), seg, prefix=two)
    alone = model(ids[:, 4:], arange_positions(1, 6), prefix=two[:, 4:])
    np.testing.assert_allclose(packed[0, 4:], alone[0], atol=2e-5)


def test_dropout_only_with_a_key_and_different_keys_differ():
    cfg = dataclasses.replace(VARIANTS["gpt2"], dropout=0.3, attention_dropout=0.3)
    model = model_of(cfg)
    ids, pos = tokens(2, 8), arange_positions(2, 8)
    det = model(ids, pos)
    np.testing.assert_array_equal(det, model(ids, pos))
    a = model(ids, pos, dropout_rng=jax.random.key(0))
    b = model(ids, pos, dropout_rng=jax.random.key(1))
    assert float(jnp.abs(a - det).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, model(ids, pos, dropout_rng=jax.random.key(0)))


def test_untied_head_has_its_own_matrix():
    tied = nnx.to_pure_dict(nnx.state(model_of(VARIANTS["gpt2"])))
    untied = nnx.to_pure_dict(nnx.state(model_of(VARIANTS["llama_gqa"])))
    assert "unembed" not in tied
    assert untied["unembed"]["lm_head"].shape == (32, 61)


def test_llama_style_model_learns_a_repeated_sequence():
    """30 AdamW steps on one repeated sequence: the loss must fall far below ln(V)."""
    cfg = VARIANTS["llama_gqa"]
    model = model_of(cfg)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    ids = tokens(4, 16, seed=5)
    pos = arange_positions(4, 16)
    tx = optax.adamw(1e-2)
    opt = tx.init(params)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(ids[:, :-1], pos[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    first = None
    for _ in range(30):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert first > 3.5  # ~ln(61) = 4.1 at init
    assert float(loss) < 0.5
