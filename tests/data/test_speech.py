"""The synthesized Morse speech data (jaxformer.data.speech): clips decoded back to their text by
an independent envelope decoder written here, ITU timing and its scaling with speed,
(seed, step, row)-determinism, a held-out split disjoint from training, the transcript
vocabulary and the character error rate against hand-worked cases."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from jaxformer.data import speech
from jaxformer.data.errors import DataError

SR = 16000

# ITU-R M.1677-1, written out again here (by character, in the Recommendation's order) so that a
# typo in the module's table cannot hide.
_CODES = (".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- "
          "...- .-- -..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----.")
_REFERENCE = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789", _CODES.split(), strict=True))
_LETTERS = {code: char for char, code in _REFERENCE.items()}


def _runs(on: np.ndarray) -> list[tuple[bool, int]]:
    """A boolean array -> [(value, run length)]."""
    edges = np.flatnonzero(np.diff(on.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [len(on)]])
    return [(bool(on[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _decode(wave: np.ndarray, wpm: float) -> str:
    """Reads Morse from a clean clip: the rectified wave smoothed over 5 ms, thresholded at half
    its peak; sounding runs under two dots are dots, else dashes; silent runs under two dots
    separate elements, under five characters, else words."""
    dot = 1.2 / wpm * SR
    smooth = np.convolve(np.abs(wave), np.ones(80) / 80, mode="same")
    runs = _runs(smooth > 0.5 * smooth.max())
    if not runs[0][0]:
        runs = runs[1:]  # leading and trailing silence
    if not runs[-1][0]:
        runs = runs[:-1]
    text, code = "", ""
    for sounding, length in runs:
        if sounding:
            code += "." if length < 2 * dot else "-"
        elif length >= 2 * dot:
            text += _LETTERS[code] + (" " if length >= 5 * dot else "")
            code = ""
    return text + _LETTERS[code]


@pytest.mark.parametrize("text,wpm", [("sos", 20.0), ("paris 73", 25.0), ("qz9 1x", 40.0),
                                      ("the quick 0", 33.0)])
def test_clean_clips_decode_to_their_text(text, wpm):
    wave = speech.morse_tone(text, wpm, tone_hz=700.0, amplitude=0.6, sample_rate=SR,
                             lead_seconds=0.1, tail_seconds=0.07, phase=1.0)
    assert wave.dtype == np.float32
    assert _decode(wave, wpm) == text
    # every sounding run lasts 1 or 3 dots, every gap 1, 3 or 7 (to a ramp's rounding)
    dot = 1.2 / wpm * SR
    on = np.abs(speech.key_envelope(text, wpm, SR, 0.1, 0.07)) > 0.5
    runs = _runs(on)
    assert runs[0] == (False, round(0.1 * SR)) and not runs[-1][0]
    for sounding, length in runs[1:-1]:
        allowed = (1, 3) if sounding else (1, 3, 7)
        assert min(abs(length - k * dot) for k in allowed) <= 2, (sounding, length / dot)


@pytest.mark.parametrize("text,units", [("e", 1), ("ee", 5), ("t e", 11), ("0", 19),
                                        ("ab", 5 + 3 + 9)])
def test_durations_follow_itu_timing_and_scale_with_one_over_wpm(text, units):
    assert speech.text_units(text) == units
    for wpm in (20.0, 40.0):
        n = len(speech.morse_tone(text, wpm, 600.0, sample_rate=SR))
        assert abs(n - units * 1.2 / wpm * SR) <= 1
    slow = len(speech.morse_tone(text, 20.0, 600.0, sample_rate=SR))
    fast = len(speech.morse_tone(text, 40.0, 600.0, sample_rate=SR))
    assert abs(slow - 2 * fast) <= 2


def test_examples_are_pure_functions_of_seed_step_row():
    wave, text = speech.train_example(3, 7, 2)
    again, text_again = speech.train_example(3, 7, 2)
    assert text == text_again and wave.tobytes() == again.tobytes()
    others = [speech.train_example(*key) for key in [(4, 7, 2), (3, 8, 2), (3, 7, 3)]]
    assert all(w.shape != wave.shape or not np.array_equal(w, wave) for w, _ in others)
    heldout = speech.heldout_example(5)
    assert speech.heldout_example(5)[0].tobytes() == heldout[0].tobytes()


def test_clips_fit_their_spec_and_the_noise_is_at_the_drawn_snr():
    spec = speech.MorseSpec(snr_db=(20.0, 20.0), amplitude=(0.5, 0.5))
    batch = speech.train_batch(seed=0, step=0, batch_size=8, spec=spec)
    assert batch.waves.shape == (8, spec.max_samples) and batch.waves.dtype == np.float32
    for wave, n, text in zip(batch.waves, batch.lengths, batch.texts, strict=True):
        assert spec.min_chars <= len(text) <= spec.max_chars and text == text.strip()
        assert not wave[n:].any()
        # the first 50 ms are silence plus noise: std 0.5 / sqrt(2) / 10
        assert abs(wave[:int(0.05 * SR)].std() / (0.5 / np.sqrt(2) / 10) - 1) < 0.1


def test_heldout_texts_never_appear_in_training():
    # One-character texts: 36 of them, so a few hundred training draws see every training text,
    # and a split that leaked would show here.
    spec = speech.MorseSpec(min_chars=1, max_chars=1)
    heldout = {c for c in "abcdefghijklmnopqrstuvwxyz0123456789"
               if zlib.crc32(c.encode()) % 10 == 0}
    assert heldout  # the split holds some out
    train = {speech.random_example(np.random.default_rng([0, 0, b]), False, spec)[1]
             for b in range(300)}
    held = {speech.random_example(np.random.default_rng([1, k]), True, spec)[1]
            for k in range(60)}
    assert train.isdisjoint(heldout) and len(train) == 36 - len(heldout)
    assert held == heldout
    # the default spec: every draw on its side of the CRC-32 split
    texts = [speech.train_example(1, s, b)[1] for s in range(40) for b in range(5)]
    assert not any(zlib.crc32(t.encode()) % 10 == 0 for t in texts)
    assert all(zlib.crc32(speech.heldout_example(k)[1].encode()) % 10 == 0 for k in range(20))


def test_text_vocabulary_round_trips():
    ids = speech.encode_text("sos 73")
    assert ids.dtype == np.int32 and len(ids) == 6 and ids.min() >= speech.CHAR_BASE
    assert ids.max() < speech.VOCAB_SIZE == 3 + 37
    assert speech.decode_text(ids) == "sos 73"
    # BOS and PAD are skipped, decoding stops at EOS
    framed = [speech.BOS_ID, *ids, speech.EOS_ID, *ids[:2], speech.PAD_ID]
    assert speech.decode_text(framed) == "sos 73"
    with pytest.raises(DataError, match="'!'"):
        speech.encode_text("hi!")
    with pytest.raises(DataError, match="leading, trailing or double spaces"):
        speech.keying("a  b")


@pytest.mark.parametrize("hyps,refs,cer", [
    ("abc", "abc", 0.0),
    ("abd", "abc", 1 / 3),  # one substitution
    ("ab", "abc", 1 / 3),  # one deletion
    ("abxc", "abc", 1 / 3),  # one insertion
    ("", "abcd", 1.0),
    ("kitten", "sitting", 3 / 7),  # k->s, e->i, +g
    (["abd", "xyz"], ["abc", "xy"], 2 / 5),  # edits and reference characters summed over pairs
])
def test_character_error_rate_on_hand_worked_cases(hyps, refs, cer):
    assert speech.character_error_rate(hyps, refs) == pytest.approx(cer)


def test_bad_specs_and_arguments_fail_clearly():
    with pytest.raises(DataError, match="Nyquist"):
        speech.MorseSpec(tone_hz=(400.0, 9000.0))
    with pytest.raises(DataError, match="max_seconds"):
        speech.MorseSpec(min_chars=8, max_chars=8, max_seconds=0.5)
    with pytest.raises(DataError, match="even at 40.0 WPM"):
        speech.render_morse("0000000000", np.random.default_rng(0))
    with pytest.raises(ValueError, match="undefined"):
        speech.character_error_rate([""], [""])
