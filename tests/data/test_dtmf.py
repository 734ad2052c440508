"""The synthesized touch-tone data (jaxformer.data.dtmf) against ITU-T Q.23 and its own
definition, with reference math written here: each key's two tones found again by an FFT of its
burst, burst and pause lengths read off the envelope, the twist and the noise level measured
from the clip, (seed, step, row)-determinism, the CRC-32 held-out split and one-line errors for
bad specs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from jaxformer.data import dtmf, speech
from jaxformer.data.errors import DataError

SR = 16000
RAMP = round(0.004 * SR)  # the 4 ms raised-cosine edges, in samples

# ITU-T Q.23, written out again here so that a typo in the module's table cannot hide:
# low (row) and high (column) frequencies in Hz, and the keys at their crossings.
_LOW = (697.0, 770.0, 852.0, 941.0)
_HIGH = (1209.0, 1336.0, 1477.0, 1633.0)
_PAD = ("1 2 3 a", "4 5 6 b", "7 8 9 c", "* 0 # d")
_Q23 = {key: (_LOW[r], _HIGH[c]) for r, row in enumerate(_PAD) for c, key in
        enumerate(row.split())}

# A clean, fixed-speed spec: no frequency offset, no audible noise, no jitter.
_CLEAN = dict(freq_tolerance=0.0, snr_db=(200.0, 200.0), tone_seconds=(0.1, 0.1),
              pause_seconds=(0.1, 0.1), jitter=0.0)


def _runs(on: np.ndarray) -> list[tuple[bool, int, int]]:
    """A boolean array -> [(value, start, length)]."""
    edges = np.flatnonzero(np.diff(on.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [len(on)]])
    return [(bool(on[a]), int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:],
                                                               strict=True)]


def _bursts(wave: np.ndarray) -> list[tuple[bool, int, int]]:
    """The clip's runs of tone and silence: the rectified wave averaged over 5 ms, against a
    tenth of its peak."""
    smooth = np.convolve(np.abs(wave.astype(np.float64)), np.ones(80) / 80, mode="same")
    return _runs(smooth > 0.1 * smooth.max())


def _tones(wave: np.ndarray, start: int, length: int) -> list[tuple[float, float]]:
    """The two strongest tones of one burst [(Hz, amplitude)], strongest first: its inside (the
    edges trimmed) Hann-windowed and zero-padded to 2**16 points (0.24 Hz apart)."""
    inside = wave[start + 2 * RAMP:start + length - 2 * RAMP].astype(np.float64)
    window = np.hanning(len(inside))
    n_fft = 2**16
    spectrum = np.abs(np.fft.rfft(inside * window, n_fft))
    freqs = np.fft.rfftfreq(n_fft, 1 / SR)
    out = []
    for _ in range(2):
        peak = int(np.argmax(spectrum))
        # |X| at a tone's frequency is its amplitude times sum(window) / 2
        out.append((float(freqs[peak]), float(spectrum[peak] / (window.sum() / 2))))
        spectrum[np.abs(freqs - freqs[peak]) < 60.0] = 0.0  # past the Hann main lobe
    return out


def _key_bursts(wave: np.ndarray, n_keys: int) -> list[tuple[int, int]]:
    bursts = [(start, length) for on, start, length in _bursts(wave) if on]
    assert len(bursts) == n_keys
    return bursts


def test_key_table_is_itu_q23():
    assert dtmf.KEYS == "0123456789abcd"
    assert {k: dtmf.KEY_TONES[k] for k in _Q23} == _Q23
    # every key the data uses has a tone and the transcript vocabulary has every key
    assert set(dtmf.KEYS) <= set(dtmf.KEY_TONES) and set(dtmf.KEYS) <= set(speech.CHARS)


def test_each_key_sounds_its_two_q23_frequencies():
    spec = dtmf.DtmfSpec(**_CLEAN, max_keys=14, max_seconds=4.0)
    keys = dtmf.KEYS
    wave = dtmf.render_dtmf(keys, np.random.default_rng(0), spec)
    for key, (start, length) in zip(keys, _key_bursts(wave, len(keys)), strict=True):
        found = sorted(f for f, _ in _tones(wave, start, length))
        # zero padding puts a bin every 0.24 Hz; the Hann window keeps the other tone's leakage
        # from moving a peak by more than a fraction of that
        assert found == pytest.approx(_Q23[key], abs=0.5), key


def test_frequencies_stay_within_the_tolerance():
    tol = 0.015
    spec = dtmf.DtmfSpec(**{**_CLEAN, "freq_tolerance": tol}, max_keys=14, max_seconds=4.0)
    offsets = []
    for seed in range(2):
        wave = dtmf.render_dtmf(dtmf.KEYS, np.random.default_rng(seed), spec)
        for key, (start, length) in zip(dtmf.KEYS, _key_bursts(wave, 14), strict=True):
            found = sorted(f for f, _ in _tones(wave, start, length))
            for f, nominal in zip(found, _Q23[key], strict=True):
                assert abs(f - nominal) <= tol * nominal + 0.5, (key, f, nominal)
                offsets.append(f / nominal - 1)
    # the offsets really are drawn: spread over most of +-1.5%, both ways
    assert min(offsets) < -0.01 and max(offsets) > 0.01


@pytest.mark.parametrize("tone,pause", [(0.1, 0.1), (0.045, 0.13), (0.15, 0.04)])
def test_tone_and_pause_lengths_with_no_jitter(tone, pause):
    spec = dtmf.DtmfSpec(**{**_CLEAN, "tone_seconds": (tone, tone),
                            "pause_seconds": (pause, pause)},
                         min_keys=5, max_keys=9, margin_seconds=(0.1, 0.1))
    keys = "9a01d5c"
    wave = dtmf.render_dtmf(keys, np.random.default_rng(1), spec)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) <= spec.max_samples
    runs = _bursts(wave)
    assert not runs[0][0] and not runs[-1][0]  # silent margins at both ends
    inner = runs[1:-1]
    assert [on for on, _, _ in inner] == [True, False] * (len(keys) - 1) + [True]
    for on, _, length in inner:
        want = (tone if on else pause) * SR
        assert abs(length - want) <= RAMP, (on, length, want)
    # the clip: margins + tones + pauses, to a sample per rounded part
    total = (0.2 + len(keys) * tone + (len(keys) - 1) * pause) * SR
    assert abs(len(wave) - total) <= 2 * len(keys) + 1


def test_jitter_varies_each_tone_and_pause_within_its_factor():
    spec = dtmf.DtmfSpec(**{**_CLEAN, "jitter": 0.2}, min_keys=5, max_keys=14, max_seconds=4.0)
    wave = dtmf.render_dtmf(dtmf.KEYS, np.random.default_rng(4), spec)
    inner = _bursts(wave)[1:-1]
    assert [on for on, _, _ in inner] == [True, False] * 13 + [True]
    tones = np.array([length for on, _, length in inner if on])
    pauses = np.array([length for on, _, length in inner if not on])
    for lengths in (tones, pauses):
        assert lengths.min() >= 0.8 * 0.1 * SR - RAMP and lengths.max() <= 1.2 * 0.1 * SR + RAMP
        assert lengths.max() - lengths.min() > 0.15 * 0.1 * SR  # varies within the clip


def test_longest_seconds_bounds_every_clip_and_is_reached():
    spec = dtmf.DtmfSpec(min_keys=7, max_keys=7)
    limit = spec.longest_seconds * SR
    assert spec.longest_seconds <= spec.max_seconds
    lengths = [len(dtmf.random_example(np.random.default_rng([5, i]), False, spec)[0])
               for i in range(300)]
    assert max(lengths) <= min(limit, spec.max_samples)
    # the same spec with every range shut at its slowest end and jitter at its most: the
    # longest clip is the bound
    slow = 1 + spec.jitter
    fixed = dtmf.DtmfSpec(min_keys=7, max_keys=7, tone_seconds=(0.15 * slow,) * 2,
                          pause_seconds=(0.15 * slow,) * 2, jitter=0.0,
                          margin_seconds=(0.25, 0.25))
    assert fixed.longest_seconds == pytest.approx(spec.longest_seconds)
    longest = dtmf.render_dtmf("0123456", np.random.default_rng(0), fixed)
    assert abs(len(longest) - limit) <= 8
    # the default spec: all clips fit max_samples
    spec = dtmf.DtmfSpec()
    for s in range(20):
        wave, keys = speech.train_example(0, s, 0, spec)
        assert len(wave) <= spec.max_samples
        assert len(wave) <= spec.longest_seconds * SR + 2 * len(keys) + 1


def test_twist_and_level_of_the_two_tones():
    # fixed twist: the high tone is twist_db over the low one, the louder at `amplitude`
    for twist_db in (-3.0, 0.0, 3.5):
        spec = dtmf.DtmfSpec(**_CLEAN, twist_db=(twist_db, twist_db), amplitude=(0.4, 0.4))
        wave = dtmf.render_dtmf("159", np.random.default_rng(2), spec)
        for key, (start, length) in zip("159", _key_bursts(wave, 3), strict=True):
            tones = dict(_tones(wave, start, length))
            (f_low, a_low), (f_high, a_high) = sorted(tones.items())
            assert (f_low, f_high) == pytest.approx(_Q23[key], abs=0.5)
            assert 20 * np.log10(a_high / a_low) == pytest.approx(twist_db, abs=0.05)
            assert max(a_low, a_high) == pytest.approx(0.4, rel=0.005)
    # the default range: every clip's twist within +-4 dB, and the clips spread over it
    lo, hi = dtmf.DtmfSpec().twist_db
    spec = dtmf.DtmfSpec(**{**_CLEAN, "freq_tolerance": 0.015})
    twists = []
    for seed in range(30):
        wave = dtmf.render_dtmf("3", np.random.default_rng(seed), spec)
        (start, length), = _key_bursts(wave, 1)
        (_, a_low), (_, a_high) = sorted(_tones(wave, start, length))
        twists.append(20 * np.log10(a_high / a_low))
    assert lo - 0.05 <= min(twists) and max(twists) <= hi + 0.05
    assert min(twists) < lo + 2 and max(twists) > hi - 2


@pytest.mark.parametrize("snr_db,amplitude", [(10.0, 0.5), (20.0, 0.5), (30.0, 0.8)])
def test_noise_is_at_the_drawn_snr(snr_db, amplitude):
    spec = dtmf.DtmfSpec(snr_db=(snr_db, snr_db), amplitude=(amplitude, amplitude),
                         margin_seconds=(0.4, 0.4), min_keys=1, max_keys=1)
    wave = dtmf.render_dtmf("5", np.random.default_rng(3), spec).astype(np.float64)
    margin = int(0.4 * SR) - 10
    noise = np.concatenate([wave[:margin], wave[-margin:]])
    # the SNR is the louder tone's power, amplitude**2 / 2, over the noise's
    want = amplitude / np.sqrt(2) / 10 ** (snr_db / 20)
    assert abs(noise.std() / want - 1) < 0.1
    assert abs(noise.mean()) < 4 * want / np.sqrt(len(noise))


def test_examples_are_pure_functions_of_seed_step_row():
    spec = dtmf.DtmfSpec()
    wave, keys = speech.train_example(3, 7, 2, spec)
    again, keys_again = speech.train_example(3, 7, 2, spec)
    assert keys == keys_again and wave.tobytes() == again.tobytes()
    assert wave.dtype == np.float32
    others = [speech.train_example(*key, spec) for key in [(4, 7, 2), (3, 8, 2), (3, 7, 3)]]
    assert all(w.shape != wave.shape or not np.array_equal(w, wave) for w, _ in others)
    held = speech.heldout_example(5, spec)
    assert speech.heldout_example(5, spec)[0].tobytes() == held[0].tobytes()
    assert held[1] == speech.heldout_example(5, spec)[1]


def test_heldout_split_and_key_draws():
    spec = dtmf.DtmfSpec()
    train = [speech.train_example(1, s, b, spec)[1] for s in range(30) for b in range(4)]
    held = [speech.heldout_example(k, spec)[1] for k in range(30)]
    for keys in train + held:
        assert set(keys) <= set(dtmf.KEYS)
        assert spec.min_keys <= len(keys) <= spec.max_keys
    assert not any(zlib.crc32(k.encode("ascii")) % 10 == 0 for k in train)
    assert all(zlib.crc32(k.encode("ascii")) % 10 == 0 for k in held)
    assert {len(k) for k in train} == set(range(spec.min_keys, spec.max_keys + 1))
    # one key a clip: 14 sequences, of which only "6" is held out (CRC-32 0 mod 10); a few
    # hundred draws see every training key and never the held-out one
    one = dtmf.DtmfSpec(min_keys=1, max_keys=1, tone_seconds=(0.04, 0.04),
                        margin_seconds=(0.0, 0.0))
    heldout = {k for k in dtmf.KEYS if zlib.crc32(k.encode()) % 10 == 0}
    assert heldout == {"6"}
    seen = {dtmf.random_example(np.random.default_rng([0, 0, b]), False, one)[1]
            for b in range(200)}
    assert seen == set(dtmf.KEYS) - heldout
    assert {dtmf.random_example(np.random.default_rng([1, k]), True, one)[1]
            for k in range(5)} == heldout


def _one_line_error(match: str, **kwargs) -> None:
    with pytest.raises(DataError, match=match) as info:
        dtmf.DtmfSpec(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["tone_seconds", "pause_seconds", "twist_db", "amplitude",
                                  "snr_db", "margin_seconds"])
def test_reversed_ranges_fail_clearly(name):
    lo, hi = getattr(dtmf.DtmfSpec(), name)
    _one_line_error(f"{name}.*lo <= hi", **{name: (hi, lo)})


def test_bad_specs_and_keys_fail_clearly():
    # 7 keys at 0.15 s * 1.1 plus 6 pauses plus two 0.25 s margins: 2.645 s
    _one_line_error("max_seconds", max_seconds=2.5)
    dtmf.DtmfSpec(max_seconds=2.65)
    _one_line_error("max_seconds", min_keys=20, max_keys=20)
    # 1633 Hz (+1.5%) needs a Nyquist frequency above it
    _one_line_error("Nyquist", sample_rate=3200, max_seconds=3.0)
    _one_line_error("Nyquist", sample_rate=3300)  # 1633 * 1.015 = 1657.5 >= 1650
    dtmf.DtmfSpec(sample_rate=3400)
    _one_line_error("min_keys", min_keys=4, max_keys=3)
    _one_line_error("min_keys", min_keys=0)
    _one_line_error("jitter", jitter=1.0)
    _one_line_error("positive", amplitude=(0.0, 0.5))
    for bad in ("*", "#", "12e", "A", " "):
        with pytest.raises(DataError, match="no DTMF tone") as info:
            dtmf.render_dtmf(bad, np.random.default_rng(0))
        assert "\n" not in str(info.value)
