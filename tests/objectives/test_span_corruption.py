from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxformer.objectives.span_corruption import (
    check_span_config,
    corrupt,
    random_spans_helper,
    random_spans_noise_mask,
    span_corruption_example,
)

SENTINELS = list(range(1000, 1100))  # 100 sentinels, as T5's extra_ids
EOS, PAD, START = 1, 0, 0


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """[(value, length)] of the maximal runs of equal values, in order."""
    return [(bool(v), len(list(g))) for v, g in itertools.groupby(mask.tolist())]


def expected_counts(length: int, density: float, mean: float) -> tuple[int, int]:
    noise = min(max(round(density * length), 1), length - 1)
    return noise, max(1, round(noise / mean))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int],
                eos_id: int) -> np.ndarray:
    """Undo span corruption: replace each sentinel in the inputs by the target tokens that
    follow the same sentinel, up to the next sentinel or EOS."""
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    sentinel_set = set(sentinels)
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1].tolist():
        if t in sentinel_set:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs[:-1].tolist():
        out.extend(spans.pop(t) if t in sentinel_set else [t])
    assert not spans, "every target span is used exactly once"
    return np.array(out)


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                           extra_in=1, extra_tgt=1):
    """Literal transcription of t5.data.preprocessors.random_spans_helper (no clipping)."""

    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_in + 1,
                num_noise_tokens + num_noise_spans * extra_tgt + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# ---------------------------------------------------------------------------- noise mask


def test_mask_has_exact_noise_and_span_counts():
    rng = np.random.default_rng(0)
    checked = 0
    for length in range(2, 301, 3):
        for density in (0.05, 0.15, 0.3, 0.5, 0.8):
            for mean in (1.0, 2.0, 3.0, 7.5):
                noise, spans = expected_counts(length, density, mean)
                if length - noise < spans:
                    with pytest.raises(ValueError, match="non-noise"):
                        random_spans_noise_mask(length, density, mean, rng)
                    continue
                for _ in range(3):
                    mask = random_spans_noise_mask(length, density, mean, rng)
                    assert mask.shape == (length,) and mask.dtype == bool
                    assert int(mask.sum()) == noise
                    r = runs(mask)
                    # Alternating non-noise / noise segments, starting non-noise, ending noise.
                    assert [v for v, _ in r] == [False, True] * spans
                    assert not mask[0] and mask[-1]
                    checked += 1
    assert checked > 4000
    # Where the clip is inactive the count is round(density * L) itself.
    mask = random_spans_noise_mask(568, 0.15, 3.0, rng)
    assert mask.sum() == 85 == round(0.15 * 568) and len(runs(mask)) == 2 * 28


def test_tiny_lengths_follow_t5():
    rng = np.random.default_rng(0)
    assert random_spans_noise_mask(0, 0.15, 3.0, rng).shape == (0,)
    assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
    assert random_spans_noise_mask(2, 0.15, 3.0, rng).tolist() == [False, True]


def test_mean_noise_span_length():
    rng = np.random.default_rng(1)
    length, density, mean = 568, 0.15, 3.0
    lengths, first_spans, last_spans = [], [], []
    for _ in range(2000):
        noise_lengths = [n for v, n in runs(random_spans_noise_mask(length, density, mean, rng))
                         if v]
        lengths.extend(noise_lengths)
        first_spans.append(noise_lengths[0])
        last_spans.append(noise_lengths[-1])
    # Counts are exact, so the pooled mean is exactly noise / spans = 85 / 28.
    assert np.mean(lengths) == pytest.approx(85 / 28, abs=1e-12)
    assert abs(np.mean(lengths) - mean) < 0.05
    # Each span's marginal mean is n / k too: no position bias (std of one span ~2.4,
    # so the standard error over 2000 samples is ~0.05).
    assert abs(np.mean(first_spans) - 85 / 28) < 0.2
    assert abs(np.mean(last_spans) - 85 / 28) < 0.2


def test_segment_lengths_are_uniform_compositions():
    # length 12, density 0.5, mean 2: 6 noise tokens in 3 spans and 6 non-noise tokens in
    # 3 segments; C(5, 2) = 10 compositions each, 100 joint outcomes, all equally likely.
    rng = np.random.default_rng(2)
    n_samples = 30_000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n_samples):
        key = tuple(n for _, n in runs(random_spans_noise_mask(12, 0.5, 2.0, rng)))
        counts[key] = counts.get(key, 0) + 1
    compositions = [c for c in itertools.product(range(1, 5), repeat=3) if sum(c) == 6]
    assert len(compositions) == math.comb(5, 2) == 10
    expected_keys = {tuple(x for pair in zip(nn, nz, strict=True) for x in pair)
                     for nn in compositions for nz in compositions}
    assert set(counts) == expected_keys  # every joint outcome appears, nothing else
    observed = np.array(list(counts.values()), dtype=float)
    expected = n_samples / 100
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 99 degrees of freedom: mean 99, the 0.999 quantile is ~148.
    assert chi2 < 148, chi2
    assert np.abs(observed / expected - 1).max() < 0.25


def test_same_seed_same_mask_different_seed_differs():
    a = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7))
    b = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7))
    c = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    kwargs = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, decoder_start_id=START,
                  inputs_length=512, targets_length=114)
    tokens = np.arange(2, 570)
    x = span_corruption_example(tokens, np.random.default_rng(3), **kwargs)
    y = span_corruption_example(tokens, np.random.default_rng(3), **kwargs)
    z = span_corruption_example(tokens, np.random.default_rng(4), **kwargs)
    for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    assert (x["enc_inputs"] != z["enc_inputs"]).any()


# ---------------------------------------------------------------------------- helper


def test_helper_matches_t5_published_numbers():
    # T5's span-corruption setup: 512 encoder tokens <- 568 raw tokens, 114 targets.
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert t5_random_spans_helper(512, 0.15, 3.0) == (568, 114)
    # 568 raw: 85 noise in 28 spans -> 483 + 28 + 1 = 512 inputs, 85 + 28 + 1 = 114 targets.
    assert random_spans_helper(114, 0.15, 3.0) == (126, 26)
    assert random_spans_helper(512, 0.5, 3.0) == (766, 512)
    # Tiny lengths: T5's loop counts 8 raw tokens as 1 noise token in round(1/3) = 0 spans and
    # returns (8, 2), but its mask makes 1 span there (inputs 9 > 8). The clipped counts don't
    # overflow.
    assert t5_random_spans_helper(8, 0.15, 3.0) == (8, 2)
    assert random_spans_helper(8, 0.15, 3.0) == (7, 3)
    raw, tlen = random_spans_helper(8, 0.15, 3.0)
    inputs, targets = corrupt(np.arange(2, 2 + raw),
                              random_spans_noise_mask(raw, 0.15, 3.0, np.random.default_rng(0)),
                              SENTINELS, EOS)
    assert (len(inputs), len(targets)) == (8, tlen)


def test_helper_is_largest_raw_length_that_fits():
    def corrupted_lengths(raw, density, mean):
        noise, spans = expected_counts(raw, density, mean)
        return raw - noise + spans + 1, noise + spans + 1

    for density in (0.15, 0.3):
        for mean in (2.0, 3.0):
            for inputs_length in range(8, 600, 7):
                raw, targets = random_spans_helper(inputs_length, density, mean)
                fits = [r for r in range(2, 3 * inputs_length)
                        if corrupted_lengths(r, density, mean)[0] <= inputs_length]
                assert raw == max(fits)
                assert targets == corrupted_lengths(raw, density, mean)[1]
                # Agrees with T5's own loop wherever its counts have a noise span.
                t5_noise = round(raw * density)
                if round(t5_noise / mean) >= 1:
                    assert (raw, targets) == t5_random_spans_helper(inputs_length, density,
                                                                    mean)


# ---------------------------------------------------------------------------- corrupt


def test_corrupt_small_example():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1], bool)
    inputs, targets = corrupt(tokens, mask, [100, 101], EOS)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 16, 101, EOS]
    assert targets.tolist() == [100, 12, 13, 101, 17, EOS]
    assert inputs.dtype == targets.dtype == np.int32
    # A mask starting with noise (not produced by the sampler) is handled the same way.
    inputs, targets = corrupt(tokens, ~mask, [100, 101, 102], EOS)
    assert inputs.tolist() == [100, 12, 13, 101, 17, EOS]
    assert targets.tolist() == [100, 10, 11, 101, 14, 15, 16, EOS]
    inputs, targets = corrupt(tokens, np.zeros(8, bool), [], EOS)
    assert inputs.tolist() == tokens.tolist() + [EOS] and targets.tolist() == [EOS]


def test_round_trip_reconstructs_tokens():
    rng = np.random.default_rng(5)
    sentinels = list(range(1000, 1400))  # dense configs below make up to 284 spans
    for length in (1, 2, 3, 10, 57, 568):
        for density, mean in ((0.15, 3.0), (0.5, 2.0), (0.3, 1.0)):
            for _ in range(20):
                tokens = rng.integers(2, 1000, length)
                noise, spans = expected_counts(max(length, 2), density, mean)
                if max(length, 2) - noise < spans:
                    continue
                mask = random_spans_noise_mask(length, density, mean, rng)
                inputs, targets = corrupt(tokens, mask, sentinels, EOS)
                n_noise, n_spans = int(mask.sum()), len([v for v, _ in runs(mask) if v])
                assert len(inputs) == length - n_noise + n_spans + 1
                assert len(targets) == n_noise + n_spans + 1
                # Sentinels in order of appearance.
                used = [t for t in inputs.tolist() if t >= 1000]
                assert used == sentinels[:n_spans]
                np.testing.assert_array_equal(reconstruct(inputs, targets, sentinels, EOS),
                                              tokens)


# ---------------------------------------------------------------------------- padded example


def test_padded_example_at_full_raw_length_fills_exactly():
    raw, tlen = random_spans_helper(512, 0.15, 3.0)
    tokens = np.random.default_rng(0).integers(2, 1000, raw)
    ex = span_corruption_example(tokens, np.random.default_rng(1), sentinel_ids=SENTINELS,
                                 eos_id=EOS, pad_id=PAD, decoder_start_id=START,
                                 inputs_length=512, targets_length=tlen)
    for key in ("enc_inputs", "enc_segment_ids", "enc_positions"):
        assert ex[key].shape == (512,) and ex[key].dtype == np.int32
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert ex[key].shape == (114,) and ex[key].dtype == np.int32
    assert ex["loss_weights"].dtype == np.float32
    # Counts are exact, so the full raw length fills both sides with no padding.
    assert ex["enc_segment_ids"].sum() == 512 and ex["loss_weights"].sum() == 114
    np.testing.assert_array_equal(ex["enc_positions"], np.arange(512))
    assert ex["enc_inputs"][-1] == EOS and ex["targets"][-1] == EOS
    np.testing.assert_array_equal(ex["inputs"], np.r_[START, ex["targets"][:-1]])
    np.testing.assert_array_equal(reconstruct(ex["enc_inputs"], ex["targets"], SENTINELS, EOS),
                                  tokens)


def test_padded_example_short_tokens_are_padded():
    tokens = np.arange(2, 42)  # 40 tokens: 6 noise in 2 spans
    ex = span_corruption_example(tokens, np.random.default_rng(2), sentinel_ids=SENTINELS,
                                 eos_id=EOS, pad_id=PAD, decoder_start_id=START,
                                 inputs_length=512, targets_length=114)
    n_enc, n_dec = 40 - 6 + 2 + 1, 6 + 2 + 1
    np.testing.assert_array_equal(ex["enc_segment_ids"], np.r_[np.ones(n_enc), np.zeros(512 -
                                                                                       n_enc)])
    np.testing.assert_array_equal(ex["enc_positions"], np.r_[np.arange(n_enc),
                                                             np.zeros(512 - n_enc)])
    assert (ex["enc_inputs"][n_enc:] == PAD).all() and ex["enc_inputs"][n_enc - 1] == EOS
    assert ex["loss_weights"].sum() == n_dec == ex["segment_ids"].sum()
    np.testing.assert_array_equal(ex["loss_weights"][:n_dec], 1.0)
    np.testing.assert_array_equal(ex["positions"], np.r_[np.arange(n_dec), np.zeros(114 - n_dec)])
    real = ex["targets"][:n_dec]
    assert real[-1] == EOS and (ex["targets"][n_dec:] == PAD).all()
    np.testing.assert_array_equal(ex["inputs"][:n_dec], np.r_[START, real[:-1]])
    assert (ex["inputs"][n_dec:] == PAD).all()
    np.testing.assert_array_equal(
        reconstruct(ex["enc_inputs"][:n_enc], real, SENTINELS, EOS), tokens)


# ---------------------------------------------------------------------------- errors


def test_errors():
    rng = np.random.default_rng(0)
    kwargs = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, decoder_start_id=START)
    with pytest.raises(ValueError, match="3 noise spans but only 2 sentinel ids"):
        corrupt(np.arange(6), np.array([0, 1, 0, 1, 0, 1], bool), [100, 101], EOS)
    with pytest.raises(ValueError, match="more than inputs_length"):
        span_corruption_example(np.arange(2, 600), rng, inputs_length=512, targets_length=114,
                                **kwargs)
    with pytest.raises(ValueError, match="more than inputs_length"):
        span_corruption_example(np.arange(2, 570), rng, inputs_length=512, targets_length=100,
                                **kwargs)
    for density in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="noise_density must be in"):
            random_spans_noise_mask(100, density, 3.0, rng)
        with pytest.raises(ValueError, match="noise_density must be in"):
            check_span_config(512, 114, density, 3.0, 100)
    with pytest.raises(ValueError, match="mean_noise_span_length must be >= 1"):
        check_span_config(512, 114, 0.15, 0.5, 100)


def test_check_span_config():
    assert check_span_config(512, 114, 0.15, 3.0, 100) == 568
    assert check_span_config(512, 200, 0.15, 3.0, 28) == 568
    with pytest.raises(ValueError, match="28 noise spans but there are only 27 sentinel"):
        check_span_config(512, 114, 0.15, 3.0, 27)
    with pytest.raises(ValueError, match="targets_length 113 is below the 114 targets"):
        check_span_config(512, 113, 0.15, 3.0, 100)
    with pytest.raises(ValueError, match="too short"):
        check_span_config(2, 10, 0.15, 3.0, 100)  # 1 raw token
    with pytest.raises(ValueError, match="too short"):
        check_span_config(5, 10, 0.05, 3.0, 100)  # 4 raw tokens, round(0.2) = 0 noise
    with pytest.raises(ValueError, match="non-noise"):
        check_span_config(64, 200, 0.9, 1.0, 100)  # every noise token its own span
    # Messages are one line, for the config layer's one-line error.
    for args in ((512, 113, 0.15, 3.0, 100), (2, 10, 0.15, 3.0, 100), (512, 114, 0.0, 3.0, 1)):
        with pytest.raises(ValueError) as info:
            check_span_config(*args)
        assert "\n" not in str(info.value)
