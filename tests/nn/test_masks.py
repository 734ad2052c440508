"""Masks against naive double loops, the prefix-LM block structure, and the no-leak property."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.attention_kernels import reference_attention, xla_attention
from jaxformer.nn.masks import (
    bidirectional_mask,
    causal_mask,
    make_mask,
    mask_to_bias,
    padding_mask,
    prefix_lm_mask,
    segment_mask,
    sliding_window_mask,
)


def loop_mask(b: int, t: int, s: int, visible) -> np.ndarray:
    """[B, 1, T, S] from a predicate visible(batch, query, key), one entry at a time."""
    out = np.zeros((b, 1, t, s), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(s):
                out[bi, 0, i, j] = visible(bi, i, j)
    return out


def check(got: jnp.ndarray, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.dtype == bool
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


SEG = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 2]])
VALID = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
PREFIX = np.array([3, 5])


def test_causal_mask_matches_loop_square_rectangular_and_offset():
    check(causal_mask(5), loop_mask(1, 5, 5, lambda b, i, j: j <= i))
    check(causal_mask(3, 6), loop_mask(1, 3, 6, lambda b, i, j: j <= i))  # top-left aligned
    check(causal_mask(2, 6, offset=3), loop_mask(1, 2, 6, lambda b, i, j: j <= i + 3))
    offsets = np.array([0, 4])  # a per-row decode-cache index
    check(causal_mask(2, 6, offset=jnp.asarray(offsets)),
          loop_mask(2, 2, 6, lambda b, i, j: j <= i + offsets[b]))


def test_bidirectional_mask_is_all_true():
    check(bidirectional_mask(3, 4), loop_mask(1, 3, 4, lambda b, i, j: True))


def test_prefix_lm_mask_matches_loop():
    want = loop_mask(2, 8, 8, lambda b, i, j: (i < PREFIX[b] and j < PREFIX[b]) or
                     (i >= PREFIX[b] and j <= i))
    check(prefix_lm_mask(jnp.asarray(PREFIX), 8), want)


def test_prefix_lm_mask_is_the_block_matrix_and_its_bias():
    p, t = 3, 7
    got = np.asarray(prefix_lm_mask(jnp.asarray([p]), t))[0, 0]
    u = t - p
    want = np.block([[np.ones((p, p)), np.zeros((p, u))],
                     [np.ones((u, p)), np.tril(np.ones((u, u)))]]).astype(bool)
    np.testing.assert_array_equal(got, want)
    neg = np.finfo(np.float32).min
    causal_bias = np.where(np.tril(np.ones((u, u))), 0.0, neg)
    want_bias = np.block([[np.zeros((p, p)), np.full((p, u), neg)],
                          [np.zeros((u, p)), causal_bias]])
    np.testing.assert_array_equal(np.asarray(mask_to_bias(got)), want_bias.astype(np.float32))


def test_padding_mask_matches_loop():
    k_valid = np.array([[1, 1, 0], [1, 0, 0]])
    check(padding_mask(jnp.asarray(VALID), jnp.asarray(k_valid)),
          loop_mask(2, 8, 3, lambda b, i, j: VALID[b, i] == 1 and k_valid[b, j] == 1))
    check(padding_mask(jnp.asarray(VALID)),
          loop_mask(2, 8, 8, lambda b, i, j: VALID[b, i] == 1 and VALID[b, j] == 1))


def test_segment_mask_matches_loop():
    check(segment_mask(jnp.asarray(SEG)),
          loop_mask(2, 8, 8, lambda b, i, j: SEG[b, i] == SEG[b, j]))
    k_seg = np.array([[1, 2, 2], [0, 1, 1]])
    check(segment_mask(jnp.asarray(SEG), jnp.asarray(k_seg)),
          loop_mask(2, 8, 3, lambda b, i, j: SEG[b, i] == k_seg[b, j]))


@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_mask_matches_loop(window):
    check(sliding_window_mask(6, window=window),
          loop_mask(1, 6, 6, lambda b, i, j: i - window < j <= i))
    check(sliding_window_mask(2, 9, window=window, offset=5),
          loop_mask(1, 2, 9, lambda b, i, j: i + 5 - window < j <= i + 5))


def test_sliding_window_follows_transformers_mistral_convention():
    torch = pytest.importorskip("torch")
    masking_utils = pytest.importorskip("transformers.masking_utils")
    window, t = 3, 7
    hf = masking_utils.sliding_window_causal_mask_function(window)
    idx = torch.arange(t)
    want = loop_mask(1, t, t, lambda b, i, j: bool(hf(idx[b], idx[0], idx[i], idx[j])))
    check(sliding_window_mask(t, window=window), want)
    assert want[0, 0, 5].sum() == window  # the token itself plus window - 1 before it


def test_make_mask_ands_the_kind_with_every_extra():
    seg, valid = jnp.asarray(SEG), jnp.asarray(VALID)
    check(make_mask("causal", segment_ids=seg, q_valid=valid),
          loop_mask(2, 8, 8, lambda b, i, j: j <= i and SEG[b, i] == SEG[b, j]
                    and VALID[b, i] == 1 and VALID[b, j] == 1))
    check(make_mask("causal", segment_ids=seg, window=2),
          loop_mask(2, 8, 8, lambda b, i, j: i - 2 < j <= i and SEG[b, i] == SEG[b, j]))
    check(make_mask("prefix", seq_len=8, prefix_len=jnp.asarray(PREFIX), k_valid=valid),
          loop_mask(2, 8, 8, lambda b, i, j: (j <= i or j < PREFIX[b]) and VALID[b, j] == 1))
    check(make_mask("bidirectional", q_valid=valid),
          loop_mask(2, 8, 8, lambda b, i, j: VALID[b, i] == 1 and VALID[b, j] == 1))
    check(make_mask("causal", seq_len=4), loop_mask(1, 4, 4, lambda b, i, j: j <= i))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="sparse", seq_len=4), "unknown attention mask kind"),
    (dict(kind="prefix", seq_len=4), "prefix_len"),
    (dict(kind="causal", seq_len=4, prefix_len=jnp.asarray([1])), "prefix_len"),
    (dict(kind="bidirectional", seq_len=4, window=2), "sliding window is causal"),
    (dict(kind="causal"), "needs seq_len"),
    (dict(kind="causal", seq_len=4, window=0), "window must be >= 1"),
])
def test_make_mask_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mask(**kwargs)


def test_mask_to_bias_values():
    bias = np.asarray(mask_to_bias(jnp.asarray([[True, False]]), jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(bias, [[0.0, float(jnp.finfo(jnp.bfloat16).min)]])
    # float32 by default, hidden keys at float32's most negative finite value
    bias32 = mask_to_bias(jnp.asarray([[True, False]]))
    assert bias32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bias32), [[0.0, -3.4028234663852886e38]])


# --- No mask kind leaks: what a query may not see cannot change its output. -------------------

B, T, N, H = 2, 8, 2, 4
LEAK_CASES = {
    # name: (dense mask, the same constraint as structured kernel arguments, or None)
    "causal": (make_mask("causal", seq_len=T), dict(is_causal=True)),
    "prefix": (make_mask("prefix", seq_len=T, prefix_len=jnp.asarray(PREFIX)), None),
    "segment": (make_mask("causal", segment_ids=jnp.asarray(SEG)),
                dict(is_causal=True, segment_ids=jnp.asarray(SEG))),
    "sliding_window": (make_mask("causal", seq_len=T, window=3), dict(window=3)),
}


@pytest.mark.parametrize("impl", [reference_attention, xla_attention],
                         ids=["reference", "xla"])
@pytest.mark.parametrize("case, form", [(case, form) for case, (_, structured) in LEAK_CASES.items()
                                        for form in ("dense", "structured")[:1 + bool(structured)]])
def test_no_mask_kind_leaks(impl, case, form):
    dense, structured = LEAK_CASES[case]
    kwargs = dict(mask=dense) if form == "dense" else structured
    attend = jax.jit(lambda q, k, v: impl(q, k, v, **kwargs))
    visible = np.broadcast_to(np.asarray(dense), (B, 1, T, T))[:, 0]  # [B, T, S]
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, N, H)).astype(np.float32) for _ in range(3))
    base = np.asarray(attend(q, k, v))
    noise_k, noise_v = (10 * rng.normal(size=(B, T, N, H)).astype(np.float32) for _ in range(2))
    for i in range(T):
        hidden = ~visible[:, i, :, None, None]  # [B, S, 1, 1]: keys query i must not see
        out = np.asarray(attend(q, k + hidden * noise_k, v + hidden * noise_v))
        np.testing.assert_array_equal(out[:, i], base[:, i])  # exactly: nothing leaks
        for b in range(B):
            j = np.flatnonzero(visible[b, i])[0]  # a key query i does see
            k2, v2 = k.copy(), v.copy()
            k2[b, j] += noise_k[b, j]
            v2[b, j] += noise_v[b, j]
            changed = np.asarray(attend(q, k2, v2))[b, i]
            assert np.abs(changed - base[b, i]).max() > 1e-3
