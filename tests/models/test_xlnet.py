"""XLNet's two-stream attention (``models.xlnet``) against its definition: the masks against
the factorisation order written out naively, and the model's outputs against what each stream
may see (a query never its own content, nobody a token later in the order), and, under the
identity order, the content stream against the framework's causal decoder with the same
weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError
from jaxformer.errors import UserError
from jaxformer.inference.families import family_for
from jaxformer.models import build_model
from jaxformer.models.build import abstract_model
from jaxformer.models.layer_stack import stack_params
from jaxformer.models.xlnet import two_stream_masks

T, V = 12, 40


def model_config(*extra: str) -> Config:
    return config_lib.apply_overrides(Config(), [
        "model.arch=xlnet", "objective.kind=permutation_lm", "model.n_layers=2",
        "model.d_model=32", "model.n_heads=2", f"model.vocab_size={V}", f"model.max_len={T}",
        f"data.seq_len={T}", *extra])


def packed_row(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, ...]:
    """Documents of ``lengths`` then padding (segment 0) up to T -> (segment ids, positions,
    order, z): z[d] is document d's factorisation order as a list of row indices, order the
    rank of each token in its document's z (padding: its offset)."""
    seg, pos, order, zs = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32), []
    start = 0
    for d, n in enumerate(lengths):
        z = start + rng.permutation(n)
        seg[start:start + n], pos[start:start + n] = d + 1, np.arange(n)
        for rank, i in enumerate(z):
            order[i] = rank
        zs.append(z.tolist())
        start += n
    order[start:] = np.arange(T - start)
    return seg, pos, order, zs


LAYOUTS = [[T], [5, 7], [3, 1, 6], [4, 4]]  # the last ones leave padding


def test_masks_are_each_tokens_predecessors_in_the_order():
    """Query t sees exactly the tokens before it in its document's order z, content t the same
    plus itself; nothing across documents; written from z, not from the ranks."""
    rng = np.random.default_rng(0)
    n_checked = 0
    for trial in range(6):
        for lengths in LAYOUTS:
            seg, _, order, zs = packed_row(rng, lengths)
            content, query = (np.asarray(m)[0, 0] for m in two_stream_masks(
                jnp.asarray(order[None]), jnp.asarray(seg[None])))
            assert content.shape == query.shape == (T, T)
            for z in zs:
                for j, t in enumerate(z):
                    before = set(z[:j])
                    assert set(np.flatnonzero(query[t]).tolist()) == before, (trial, z, t)
                    assert set(np.flatnonzero(content[t]).tolist()) == before | {t}
                    n_checked += 1
            real = seg > 0
            assert not np.diag(query).any()  # a query never sees its own content
            assert np.diag(content).all()
            assert not (query[real][:, ~real].any() or content[real][:, ~real].any())
    assert n_checked == 6 * sum(map(sum, LAYOUTS))


def test_identity_order_is_the_causal_mask():
    seg = jnp.ones((1, T), jnp.int32)
    content, query = two_stream_masks(jnp.arange(T)[None], seg)
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(np.asarray(content)[0, 0], causal)
    np.testing.assert_array_equal(np.asarray(query)[0, 0], causal & ~np.eye(T, dtype=bool))


def _model(*extra: str):
    return build_model(model_config(*extra).model, nnx.Rngs(0))


@pytest.mark.parametrize("extra", [("model.pos_encoding=rope",),
                                   ("model.pos_encoding=learned", "model.norm_position=post"),
                                   ("model.pos_encoding=t5_relative",)],
                         ids=["rope", "learned-post-ln", "t5_relative"])
def test_streams_see_only_what_the_order_allows(extra):
    """Changing token i leaves its own query-stream logits and every output of a token before
    it in the order unchanged, and changes its content stream and the outputs of the tokens
    after it (so the checks can fail)."""
    model = _model(*extra)
    rng = np.random.default_rng(1)
    seg, pos_ids, order, zs = packed_row(rng, [7, 5])
    tokens = rng.integers(0, V, T).astype(np.int32)

    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(toks: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return nnx.merge(graphdef, params)(toks, jnp.asarray(pos_ids[None]),
                                           jnp.asarray(seg[None]),
                                           order=jnp.asarray(order[None]), return_content=True)

    def run(toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, c = forward(jnp.asarray(toks[None]))
        return np.asarray(q[0]), np.asarray(c[0])

    q0, c0 = run(tokens)
    for z in zs:
        for i in (z[0], z[len(z) // 2], z[-1]):  # the first, a middle and the last in the order
            changed = tokens.copy()
            changed[i] = (tokens[i] + 1 + rng.integers(0, V - 1)) % V
            q1, c1 = run(changed)
            np.testing.assert_allclose(q1[i], q0[i], atol=1e-6)  # never sees its own content
            assert np.abs(c1[i] - c0[i]).max() > 1e-4  # ... which its content stream holds
            rank = order[i]
            doc = seg == seg[i]
            earlier, later = doc & (order < rank), doc & (order > rank)
            np.testing.assert_allclose(q1[earlier], q0[earlier], atol=1e-6)
            np.testing.assert_allclose(c1[earlier], c0[earlier], atol=1e-6)
            np.testing.assert_allclose(q1[~doc], q0[~doc], atol=1e-6)  # other documents
            np.testing.assert_allclose(c1[~doc], c0[~doc], atol=1e-6)
            if later.any():
                assert np.abs(q1[later] - q0[later]).max(-1).min() > 1e-5


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_identity_order_content_stream_is_the_causal_decoder(pos):
    """Under the identity order the content stream is a causal decoder: the framework's
    DecoderLM with the same weights gives its logits, documents packed."""
    cfg = model_config(f"model.pos_encoding={pos}").model
    xlnet = build_model(cfg, nnx.Rngs(3))
    decoder_cfg = config_lib.apply_overrides(Config(), [
        f"model.pos_encoding={pos}", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
        f"model.vocab_size={V}", f"model.max_len={T}", f"data.seq_len={T}"]).model
    decoder = build_model(decoder_cfg, nnx.Rngs(7))
    weights = nnx.to_pure_dict(nnx.state(xlnet))
    del weights["query_embed"]
    nnx.update(decoder, weights)
    rng = np.random.default_rng(2)
    seg, pos_ids, _, _ = packed_row(rng, [5, 7])
    tokens = jnp.asarray(rng.integers(0, V, (1, T)), jnp.int32)
    args = (tokens, jnp.asarray(pos_ids[None]), jnp.asarray(seg[None]))
    query, content = xlnet(*args, return_content=True)
    expected = decoder(*args)
    np.testing.assert_allclose(np.asarray(content), np.asarray(expected), atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(query) - np.asarray(expected)).max() > 1e-3  # another stream


def test_scanned_layers_compute_the_looped_model():
    looped, scanned = model_config(), model_config("model.scan_layers=true")
    a, b = build_model(looped.model, nnx.Rngs(0)), build_model(scanned.model, nnx.Rngs(0))
    nnx.update(b, stack_params(nnx.to_pure_dict(nnx.state(a))))
    rng = np.random.default_rng(4)
    seg, pos_ids, order, _ = packed_row(rng, [6, 6])
    args = (jnp.asarray(rng.integers(0, V, (1, T)), jnp.int32), jnp.asarray(pos_ids[None]),
            jnp.asarray(seg[None]))
    np.testing.assert_allclose(np.asarray(a(*args, order=jnp.asarray(order[None]))),
                               np.asarray(b(*args, order=jnp.asarray(order[None]))), atol=1e-5)


@pytest.mark.parametrize("override, needle", [
    ("model.pos_encoding=none", "model.pos_encoding"),
    ("model.pos_encoding=alibi", "model.pos_encoding"),
    ("model.attention_type=linear", "model.attention_type='mha'"),
    ("model.n_experts=2", "model.n_experts=0"),
    ("model.sliding_window=4", "model.sliding_window=0"),
])
def test_config_refuses_what_two_streams_cannot_take(override, needle):
    with pytest.raises(ConfigError, match="xlnet") as e:
        model_config(override)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_generation_refuses_a_permutation_lm():
    cfg = model_config()
    with pytest.raises(UserError, match="permutation") as e:
        family_for(cfg, abstract_model(cfg.model)[0])
    assert "\n" not in str(e.value)
