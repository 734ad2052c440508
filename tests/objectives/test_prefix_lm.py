from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.data.packing import make_stream, row_batch
from jaxformer.models.decoder import prefix_mask
from jaxformer.nn.masks import segment_mask
from jaxformer.objectives.prefix_lm import (
    check_prefix_config,
    prefix_attention_mask,
    prefix_example,
    prefix_example_from_pair,
    split_bounds,
)

EOS_ID, PAD_ID = 0, 1


def packed_rows(seed: int, seq_len: int = 64, n_rows: int = 8) -> dict[str, np.ndarray]:
    """Rows of `packing.row_batch` over documents of 0..30 tokens (+ EOS): segments of length
    1 (a lone EOS) up to a full row."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, 100, int(rng.integers(0, 31))).astype(np.int32) for _ in range(60)]
    stream = make_stream(docs, EOS_ID, order_seed=seed)
    return row_batch(stream, np.arange(n_rows), seq_len).as_dict()


def runs(seg: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of equal segment ids."""
    edges = np.flatnonzero(np.diff(seg)) + 1
    starts = np.concatenate([[0], edges])
    return list(zip(starts.tolist(), np.diff(np.append(starts, len(seg))).tolist(), strict=True))


def apply(row: dict[str, np.ndarray], seed: int, **kw) -> dict[str, np.ndarray]:
    return prefix_example(row["inputs"], row["targets"], row["segment_ids"], row["positions"],
                          row["loss_weights"], np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("fracs", [(0.25, 0.75), (0.1, 0.3), (0.5, 0.5)])
def test_split_within_bounds_prefix_exact_and_loss_on_continuation(fracs):
    lo_f, hi_f = fracs
    n_segments = n_kept = 0
    for seed in range(30):
        batch = packed_rows(seed)
        for b in range(len(batch["inputs"])):
            row = {k: v[b] for k, v in batch.items()}
            out = apply(row, seed * 100 + b, min_prefix_frac=lo_f, max_prefix_frac=hi_f)
            for key in row:
                if key != "loss_weights":
                    np.testing.assert_array_equal(out[key], row[key])
            expected_w = np.zeros_like(row["loss_weights"])
            for start, L in runs(row["segment_ids"]):
                p = out["prefix"][start:start + L]
                k = int(p.sum())
                # The prefix is exactly the first k tokens of the segment.
                np.testing.assert_array_equal(p, np.arange(L) < k)
                if L == 1:
                    assert k == 0
                else:
                    lo = min(max(math.ceil(round(lo_f * L, 9)), 1), L - 1)
                    hi = max(lo, min(max(math.floor(round(hi_f * L, 9)), 1), L - 1))
                    assert lo <= k <= hi, (L, k, lo, hi)
                # Predictions from the last prefix token on keep their packing weight.
                keep = np.arange(L) >= k - 1
                expected_w[start:start + L] = row["loss_weights"][start:start + L] * keep
                n_kept += int((row["loss_weights"][start:start + L] * keep).sum())
                n_segments += 1
            np.testing.assert_array_equal(out["loss_weights"], expected_w)
            assert out["prefix"].dtype == np.int32 and out["loss_weights"].dtype == np.float32
            # No kept prediction has a target inside its own document's prefix.
            target_in_prefix = np.r_[out["prefix"][1:], 0].astype(bool) & (
                np.r_[row["segment_ids"][1:], -1] == row["segment_ids"])
            assert not (out["loss_weights"] > 0)[target_in_prefix].any()
    assert n_segments > 500 and n_kept > 0


def test_hand_example_two_documents():
    # Documents of 8 and 4 tokens; min = max = 0.5 fixes the splits at 4 and 2.
    seg = np.array([1] * 8 + [2] * 4, np.int32)
    inputs = np.arange(10, 22, dtype=np.int32)
    targets = np.r_[inputs[1:], 99].astype(np.int32)
    weights = np.ones(12, np.float32)
    weights[7] = 0  # the first document's last input predicts the second's first token
    positions = np.r_[np.arange(8), np.arange(4)].astype(np.int32)
    out = prefix_example(inputs, targets, seg, positions, weights, np.random.default_rng(0),
                         min_prefix_frac=0.5, max_prefix_frac=0.5)
    assert out["prefix"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert out["loss_weights"].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    # (8 - 4 + 1 predictions, minus the boundary one) + (4 - 2 + 1) = 4 + 3.
    assert out["loss_weights"].sum() == 7


def test_padding_and_single_token_segments_get_no_prefix():
    seg = np.array([1, 2, 2, 2, 2, 0, 0], np.int32)
    z = np.zeros(7, np.int32)
    w = np.array([0, 1, 1, 1, 0, 0, 0], np.float32)
    for seed in range(20):
        out = prefix_example(z, z, seg, z, w, np.random.default_rng(seed))
        assert out["prefix"][[0, 5, 6]].tolist() == [0, 0, 0]
        assert out["loss_weights"][0] == 0 and out["loss_weights"][5:].sum() == 0
        assert 1 <= out["prefix"][1:5].sum() <= 3  # L = 4: ceil(1) .. floor(3)


def test_split_is_uniform_over_the_bounds():
    L = 20  # splits 5..15: 11 values
    seg = np.ones(L, np.int32)
    z = np.zeros(L, np.int32)
    w = np.ones(L, np.float32)
    ks = np.array([prefix_example(z, z, seg, z, w, np.random.default_rng(s))["prefix"].sum()
                   for s in range(5500)])
    counts = np.bincount(ks, minlength=21)
    assert counts[:5].sum() == 0 and counts[16:].sum() == 0
    assert np.all(np.abs(counts[5:16] / 5500 - 1 / 11) < 0.02), counts


def test_split_bounds():
    lo, hi = split_bounds(np.array([1, 2, 3, 4, 10, 100]), 0.25, 0.75)
    assert lo.tolist() == [0, 1, 1, 1, 3, 25]
    assert hi.tolist() == [0, 1, 2, 3, 7, 75]
    lo, hi = split_bounds(np.array([3, 10]), 0.5, 0.5)
    assert lo.tolist() == [2, 5] and hi.tolist() == [2, 5]


def test_deterministic_per_seed():
    row = {k: v[0] for k, v in packed_rows(1).items()}
    a, b, c = apply(row, 5), apply(row, 5), apply(row, 6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["prefix"], c["prefix"])


def test_attention_mask_one_segment_is_prefix_block_matrix():
    T, P = 7, 3
    prefix = (np.arange(T) < P).astype(np.int32)
    mask = prefix_attention_mask(np.ones(T, np.int32), prefix)
    expected = np.zeros((T, T), bool)
    expected[:P, :P] = True  # [[1, 0],
    expected[P:, :P] = True  #  [1, causal]]
    expected[P:, P:] = np.tril(np.ones((T - P, T - P), bool))
    np.testing.assert_array_equal(mask, expected)


def test_attention_mask_block_diagonal_and_matches_model():
    seg = np.array([1, 1, 1, 1, 2, 2, 2, 0, 0], np.int32)
    prefix = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0], np.int32)
    mask = prefix_attention_mask(seg, prefix)
    for a, b in [(0, 4), (4, 7), (7, 9)]:
        block = np.zeros_like(mask)
        block[a:b, a:b] = True
        assert not (mask & ~block)[a:b].any()  # nothing visible across segments
    np.testing.assert_array_equal(mask[:4, :4], prefix_attention_mask(np.ones(4), prefix[:4]))
    assert mask[0, 1] and not mask[0, 2] and mask[3, 0]
    model = prefix_mask(jnp.asarray(prefix)[None]) & segment_mask(jnp.asarray(seg)[None])
    np.testing.assert_array_equal(mask, np.asarray(model)[0, 0])


def test_pair_layout():
    out = prefix_example_from_pair(np.array([5, 6, 7]), np.array([8, 9]), 8, EOS_ID, PAD_ID)
    assert out["inputs"].tolist() == [5, 6, 7, 0, 8, 9, 1, 1]
    assert out["targets"].tolist() == [6, 7, 0, 8, 9, 0, 1, 1]
    assert out["prefix"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out["loss_weights"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert out["segment_ids"].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert out["positions"].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert {k: v.dtype for k, v in out.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
        "positions": np.int32, "prefix": np.int32, "loss_weights": np.float32}
    # Loss only on predictions whose target is a target token or the final EOS.
    assert out["targets"][out["loss_weights"] > 0].tolist() == [8, 9, 0]
    exact = prefix_example_from_pair(np.array([5, 6, 7]), np.array([8, 9]), 6, EOS_ID, PAD_ID)
    assert exact["segment_ids"].tolist() == [1] * 6


def test_errors():
    check_prefix_config(0.5, 0.5)
    for lo, hi in [(0.0, 0.5), (0.6, 0.5), (0.5, 1.0), (-0.1, 0.5)]:
        with pytest.raises(ValueError, match="0 < min <= max < 1"):
            check_prefix_config(lo, hi)
    with pytest.raises(ValueError, match="need 6 input positions"):
        prefix_example_from_pair(np.array([5, 6, 7]), np.array([8, 9]), 5, EOS_ID, PAD_ID)
    with pytest.raises(ValueError, match="1-D"):
        prefix_example_from_pair(np.ones((2, 2)), np.array([8]), 8, EOS_ID, PAD_ID)
    z = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="loss_weights must have shape"):
        prefix_example(z, z, z, z, np.zeros(5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="prefix fractions"):
        prefix_example(z, z, z, z, z, np.random.default_rng(0), min_prefix_frac=0.9,
                       max_prefix_frac=0.2)
