"""Reformer's memory savers as model options: reversible blocks (``model.reversible``) and the
chunked feed-forward (``model.ff_chunks``).

The reversible stack's custom_vjp gives the loss and gradients of the same reversible math
differentiated by plain autodiff (``layer_stack.reversible_loop``), dropout included; its
compiled temporary memory does not grow with depth while the plain model's does; a
reversible model learns through the real train step and decodes with a KV cache; what it
cannot take is a one-line config error. The chunked feed-forward equals the unchunked one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models import build_model, layer_stack
from jaxformer.models.build import abstract_model
from jaxformer.nn.feedforward import FeedForward
from jaxformer.objectives import get_objective
from jaxformer.train.step import make_loss_sums
from tests.train.helpers import make_runner, random_batch, tiny_config

TINY = dict(d_model=32, n_heads=4, vocab_size=61, max_len=16, reversible=True)
FORWARD = {"decoder": get_objective("causal").logits,
           "encoder": get_objective("masked_lm").logits}


def _batch(b: int = 2, t: int = 16, vocab: int = 61, seed: int = 0) -> dict[str, np.ndarray]:
    """Two packed documents in row 0, padding at the end of row 1."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 2:] = 2
    seg[1, -3:] = 0
    positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
    positions[0, t // 2:] -= t // 2
    return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "segment_ids": seg,
            "positions": positions, "loss_weights": (seg > 0).astype(np.float32)}


def _loss_and_grads(cfg: ModelConfig, params, batch, key=None):
    loss_sums = make_loss_sums(abstract_model(cfg)[0], FORWARD[cfg.arch])

    def loss(p):
        sums = loss_sums(p, batch, key)
        return sums["loss_sum"] / sums["weight_sum"]

    return jax.jit(jax.value_and_grad(loss))(params)


def _plain_loop(blocks, cfg, x, inputs, rngs):
    """``apply_reversible`` without its custom_vjp: the blocks' own ``reversible_step`` in a
    Python loop (a scanned stack's blocks are its stacked state, sliced)."""
    if not isinstance(blocks, nnx.List):
        graphdef, state = nnx.split(blocks)
        blocks = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                  for i in range(cfg.n_layers)]
    return layer_stack.reversible_loop(blocks, x, inputs, rngs)


CASES = {
    # causal, with dropout (the backward pass must redraw the masks from the same keys;
    # attention dropout takes its key the same way), scanned layers (the parameters arrive
    # stacked)
    "decoder_dropout_scanned": ModelConfig(**TINY, n_layers=2, pos_encoding="rope",
                                           dropout=0.1, attention="reference",
                                           scan_layers=True),
    # bidirectional, looped layers (their parameters are stacked for the custom_vjp), T5's
    # learned bias (the shared context gets a gradient), chunked feed-forwards
    "encoder_t5_bias": ModelConfig(**TINY, arch="encoder", n_layers=2,
                                   pos_encoding="t5_relative", relative_buckets=8,
                                   relative_max_distance=16, ff_chunks=2,
                                   attention="reference"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_vjp_equals_plain_autodiff_of_the_same_math(name, monkeypatch):
    cfg = CASES[name]
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0))))
    batch = _batch()
    key = jax.random.key(3) if cfg.dropout else None
    loss_rev, grads_rev = _loss_and_grads(cfg, params, batch, key)
    monkeypatch.setattr(layer_stack, "apply_reversible", _plain_loop)
    loss_plain, grads_plain = _loss_and_grads(cfg, params, batch, key)
    np.testing.assert_allclose(loss_rev, loss_plain, rtol=1e-6)
    paths = jax.tree_util.tree_flatten_with_path(grads_plain)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(grads_rev), strict=True):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max() + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
    grads = grads_rev
    assert np.abs(jax.tree.leaves(grads["blocks"])[0]).max() > 0
    if name == "encoder_t5_bias":  # the bias is computed once, outside the custom_vjp
        assert np.abs(grads["rel_bias"]["module"]["embedding"]).max() > 0


# --- memory -----------------------------------------------------------------------------------

MEMORY_SHAPE = dict(batch=8, seq=256, d_model=64)  # activations dominate the parameters


def grad_temp_bytes(n_layers: int, reversible: bool, batch: int = 8, seq: int = 256,
                    d_model: int = 64, scan_layers: bool = True) -> int:
    """Compiled temporary bytes of jit(grad(loss)) of a decoder, 4 heads, vocabulary 64, the
    reference attention kernel (nothing is run). Scanned layers: the compile time does not
    grow with depth."""
    cfg = ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=4, vocab_size=64,
                      max_len=seq, reversible=reversible, attention="reference",
                      scan_layers=scan_layers)
    graphdef, state = abstract_model(cfg)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nnx.to_pure_dict(state))
    loss_sums = make_loss_sums(graphdef, FORWARD["decoder"])
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_spec = {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
                  "loss_weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    grad = jax.jit(jax.grad(lambda p, b: loss_sums(p, b)["loss_sum"]))
    return grad.lower(params, batch_spec).compile().memory_analysis().temp_size_in_bytes


def test_reversible_activation_memory_does_not_grow_with_depth():
    rev = {n: grad_temp_bytes(n, True) for n in (2, 8)}
    plain = {n: grad_temp_bytes(n, False) for n in (2, 8)}
    print(f"temp bytes of jit(grad(loss)), {MEMORY_SHAPE}: reversible {rev}, plain {plain}")
    assert plain[8] > 2 * plain[2]
    assert rev[8] < 1.3 * rev[2]
    assert rev[8] < 0.5 * plain[8]


# --- training and decoding --------------------------------------------------------------------

def test_reversible_chunked_model_memorizes_a_batch_through_the_train_step():
    cfg = tiny_config("model.reversible=true", "model.ff_chunks=2")
    state, step, sharding = make_runner(cfg)
    batch = jax.device_put(random_batch(cfg, 0), sharding)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)), losses
    assert losses[0] > 0.9 * np.log(64)  # starts near uniform over the vocabulary
    assert losses[-1] < 0.6 * losses[0], losses  # learns: memorizes the batch


def test_reversible_decoder_decodes_as_its_full_forward():
    """KV-cache decoding (a 5-token prompt, then one token at a time) gives the full causal
    forward's logits, so greedy decoding is the argmax of the full forward."""
    cfg = ModelConfig(**TINY, n_layers=2, pos_encoding="rope", ff_chunks=3,
                      attention="reference")
    model = build_model(cfg, nnx.Rngs(2))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(_batch(b=2, t=12)["inputs"])
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(
        x, jnp.broadcast_to(jnp.arange(12), (2, 12))))(state, tokens)
    decode = jax.jit(lambda s, x, c, i: nnx.merge(graphdef, s).decode(x, c, i))
    logits, cache = decode(state, tokens[:, :5], model.init_cache(2, 12), jnp.asarray(0))
    got = [logits]
    for i in range(5, 12):  # ff_chunks=3 on one token: a single slice
        logits, cache = decode(state, tokens[:, i:i + 1], cache, jnp.asarray(i))
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(full, -1))


# --- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (("model.reversible=true", "model.norm_position=post"), "model.norm_position='pre'"),
    (("model.reversible=true", "model.arch=encoder_decoder"), "model.arch='decoder'"),
    (("model.reversible=true", "model.n_experts=2"), "model.n_experts=0"),
    (("model.reversible=true", "model.remat=full"), "model.remat='none'"),
    (("model.ff_chunks=0",), "model.ff_chunks: 0 must be >= 1"),
    (("model.ff_chunks=2", "model.n_experts=2"), "model.ff_chunks=1 with model.n_experts"),
])
def test_what_reversible_and_ff_chunks_cannot_take_is_a_one_line_config_error(overrides,
                                                                               match):
    with pytest.raises(ConfigError, match=match) as info:
        config_lib.validate(tiny_config(*overrides))
    assert "\n" not in str(info.value)
    assert ("model.reversible" in str(info.value)) == ("model.reversible=true" in overrides)


# --- chunked feed-forward ---------------------------------------------------------------------

def test_chunked_feed_forward_equals_unchunked():
    ff = FeedForward(16, 48, activation="swiglu", use_bias=True, init_std=0.5, out_std=0.5,
                     dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(ff)
    x = jax.random.normal(jax.random.key(1), (3, 10, 16))

    def run(chunks):
        def loss(p, x):
            y = nnx.merge(graphdef, p)(x, chunks=chunks)
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, want), want_grads = run(1)
    for chunks in (3, 16):  # 3: 10 rows padded to 12; 16: more chunks than rows
        (_, got), got_grads = run(chunks)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
