"""Speech sources as seq2seq batches (jaxformer.data.speech_task): the layout the seq2seq
objective reads, (seed, step, row)-determinism and process shares, the held-out set, and the
one-line errors for unknown sources and transcripts longer than the decoder."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.data import speech, speech_task
from jaxformer.data.errors import DataError


@pytest.fixture(scope="module")
def task() -> speech_task.SpeechTask:
    return speech_task.SpeechTask.create("speech:morse", 16000, 3.0, seq_len=8)


def test_batch_layout(task):
    batch = task.train_batch(5, 4, 0, range(4))
    assert batch["audio"].shape == (4, 48000) and batch["audio"].dtype == np.float32
    assert batch["audio_mask"].shape == (4, 300)
    for key in ("inputs", "targets", "segment_ids", "positions", "loss_weights"):
        assert batch[key].shape == (4, 8), key
    for r in range(4):
        wave, text = speech.train_example(0, 5, r)
        n = len(text) + 1
        np.testing.assert_array_equal(batch["audio"][r, :len(wave)], wave)
        assert not batch["audio"][r, len(wave):].any()
        assert batch["audio_mask"][r].sum() == len(wave) // 160
        assert batch["audio_mask"][r, :len(wave) // 160].all()
        assert speech.decode_text(batch["inputs"][r]) == text  # BOS skipped
        assert batch["inputs"][r, 0] == speech.BOS_ID
        assert batch["targets"][r, n - 1] == speech.EOS_ID
        assert speech.decode_text(batch["targets"][r]) == text
        # the decoder reads target i - 1 at position i (teacher forcing)
        np.testing.assert_array_equal(batch["inputs"][r, 1:n], batch["targets"][r, :n - 1])
        assert batch["loss_weights"][r].tolist() == [1.0] * n + [0.0] * (8 - n)
        assert batch["segment_ids"][r].tolist() == [1] * n + [0] * (8 - n)
        assert not batch["inputs"][r, n:].any() and not batch["targets"][r, n:].any()


def test_batches_are_a_function_of_seed_step_and_row(task):
    a = task.train_batch(3, 4, 7, range(4))
    b = task.train_batch(3, 4, 7, range(4))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # two process shares of the batch are its two halves
    halves = [task.train_batch(3, 4, 7, range(0, 2)), task.train_batch(3, 4, 7, range(2, 4))]
    for key in a:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), a[key])
    other_step, other_seed = task.train_batch(4, 4, 7, range(4)), task.train_batch(3, 4, 8,
                                                                                   range(4))
    assert not np.array_equal(other_step["audio"], a["audio"])
    assert not np.array_equal(other_seed["audio"], a["audio"])


def test_heldout_batches_are_fixed_and_disjoint_from_training(task):
    batches = list(task.val_batches(16, 2))
    assert len(batches) == 2
    texts = [speech.decode_text(row) for b in batches for row in b["targets"]]
    assert texts == [task.heldout(k)[1] for k in range(32)]
    again = next(task.val_batches(16, 1))
    np.testing.assert_array_equal(again["audio"], batches[0]["audio"])
    train_texts = {speech.decode_text(r) for s in range(20)
                   for r in task.train_batch(s, 16, 0, range(16))["targets"]}
    assert not train_texts & set(texts)
    assert len(list(task.val_batches(64, None))) == speech_task.HELDOUT_CLIPS // 64


def test_errors_are_one_line():
    with pytest.raises(DataError, match="unknown speech source 'speech:piano'"):
        speech_task.check("speech:piano", 16000, 3.0, 8)
    with pytest.raises(DataError, match=r"6 characters \+ EOS = 7 decoder tokens, more than "
                                        r"data.seq_len=6") as info:
        speech_task.check("speech:morse", 16000, 3.0, 6)
    assert "\n" not in str(info.value)
    speech_task.check("speech:morse", 16000, 3.0, 7)  # exactly enough


def test_char_tokenizer_round_trip():
    tok = speech_task.CharTokenizer()
    ids = tok.encode("sos 42")
    assert tok.decode([speech.BOS_ID, *ids, speech.EOS_ID, 9]) == "sos 42"
    assert tok.token_to_id("<eos>") == speech.EOS_ID and tok.token_to_id("a") == 3
    assert tok.token_to_id("A") is None
