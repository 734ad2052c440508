from __future__ import annotations

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from jaxformer.data.tokenizer import EOS, PAD, train_tokenizer
from jaxformer.objectives.masked_lm import (
    BYTE_OF_CHAR,
    _random_non_special,
    check_mlm_config,
    mask_example,
    word_starts_from_tokenizer,
)

V = 1000
EOS_ID, PAD_ID, MASK_ID = 0, 1, 2
SPECIALS = (EOS_ID, PAD_ID, MASK_ID, 500, 999)


def make_row(rng: np.random.Generator, T: int = 256, n_pad: int = 20):
    """A packed row: 3 documents ending in EOS, some special tokens inside, padding at the end."""
    tokens = rng.integers(0, V, T).astype(np.int32)
    seg = np.repeat(np.arange(1, 4), [T // 3, T // 3, T - 2 * (T // 3)]).astype(np.int32)
    ends = np.flatnonzero(np.diff(seg)) if T > 1 else np.zeros(0, int)
    tokens[ends] = EOS_ID
    tokens[rng.integers(0, T, 5)] = 500
    tokens[T - n_pad:] = PAD_ID
    seg[T - n_pad:] = 0
    return tokens, seg


def candidates_of(tokens, seg):
    return (seg > 0) & ~np.isin(tokens, SPECIALS)


def run(tokens, seg, seed, **kw):
    kw = dict(mask_id=MASK_ID, vocab_size=V, special_ids=SPECIALS) | kw
    return mask_example(tokens, seg, np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.5])
def test_selects_exactly_round_rate_times_candidates(rate):
    for seed in range(50):
        rng = np.random.default_rng(seed)
        tokens, seg = make_row(rng, T=int(rng.integers(20, 300)), n_pad=int(rng.integers(0, 10)))
        n_cand = int(candidates_of(tokens, seg).sum())
        out = run(tokens, seg, seed, mask_rate=rate)
        assert out["loss_weights"].sum() == max(1, round(rate * n_cand))
        assert out["loss_weights"].dtype == np.float32


def test_at_least_one_selection_and_none_without_candidates():
    tokens = np.array([5, 6, 0, 1, 1], np.int32)
    seg = np.array([1, 1, 1, 0, 0], np.int32)
    out = run(tokens, seg, 0, mask_rate=0.1)  # round(0.1 * 2) = 0 -> 1
    assert out["loss_weights"].sum() == 1
    assert set(np.flatnonzero(out["loss_weights"])) <= {0, 1}
    only_special = np.array([0, 500, 1], np.int32)
    out = run(only_special, np.array([1, 1, 0], np.int32), 0)
    assert out["loss_weights"].sum() == 0
    np.testing.assert_array_equal(out["inputs"], only_special)


def test_specials_and_padding_never_selected_targets_are_originals():
    for seed in range(200):
        tokens, seg = make_row(np.random.default_rng(seed))
        out = run(tokens, seg, seed)
        sel = out["loss_weights"] > 0
        assert not (sel & ~candidates_of(tokens, seg)).any()
        np.testing.assert_array_equal(out["targets"], tokens)
        np.testing.assert_array_equal(out["segment_ids"], seg)
        # Unselected positions are never corrupted.
        np.testing.assert_array_equal(out["inputs"][~sel], tokens[~sel])


def test_positions_restart_per_segment():
    seg = np.array([1, 1, 1, 2, 2, 3, 0, 0], np.int32)
    out = run(np.arange(10, 18, dtype=np.int32), seg, 0)
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 0, 1, 0, 0, 1])


def test_80_10_10_split_and_random_tokens_not_special():
    tokens_all, inp_all = [], []
    for seed in range(140):  # 140 rows x 150 selections = 21,000 selections
        rng = np.random.default_rng(1000 + seed)
        tokens = rng.integers(0, V, 1000).astype(np.int32)
        tokens[np.isin(tokens, SPECIALS)] = 7
        seg = np.ones(1000, np.int32)
        out = run(tokens, seg, seed)
        sel = out["loss_weights"] > 0
        tokens_all.append(tokens[sel])
        inp_all.append(out["inputs"][sel])
    orig, inp = np.concatenate(tokens_all), np.concatenate(inp_all)
    n = len(orig)
    assert n == 140 * 150
    masked = inp == MASK_ID
    replaced = ~masked & (inp != orig)
    kept = inp == orig  # includes the ~0.1% random draws that hit the original token
    assert abs(masked.mean() - 0.8) < 0.02, masked.mean()
    assert abs(replaced.mean() - 0.1) < 0.02, replaced.mean()
    assert abs(kept.mean() - 0.1) < 0.02, kept.mean()
    assert not np.isin(inp[replaced], SPECIALS).any()


def test_random_replacement_uniform_over_non_special():
    special = np.array([0, 3, 9])
    draws = _random_non_special(np.random.default_rng(0), 70_000, 10, special)
    counts = np.bincount(draws, minlength=10)
    assert counts[special].sum() == 0
    non_special = np.setdiff1d(np.arange(10), special)
    assert np.all(np.abs(counts[non_special] / 70_000 - 1 / 7) < 0.01), counts


def test_probabilities_respected_at_the_extremes():
    tokens = np.arange(10, 110, dtype=np.int32)
    seg = np.ones(100, np.int32)
    out = run(tokens, seg, 0, mask_token_prob=1.0, random_token_prob=0.0)
    sel = out["loss_weights"] > 0
    assert np.all(out["inputs"][sel] == MASK_ID)
    out = run(tokens, seg, 0, mask_token_prob=0.0, random_token_prob=0.0)
    np.testing.assert_array_equal(out["inputs"], tokens)
    assert out["loss_weights"].sum() == 15


def test_deterministic_per_seed():
    tokens, seg = make_row(np.random.default_rng(3))
    starts = np.random.default_rng(4).random(len(tokens)) < 0.4
    for ws in (None, starts):
        a, b, c = (run(tokens, seg, s, word_starts=ws) for s in (11, 11, 12))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["loss_weights"], c["loss_weights"])


def words_of(tokens, seg, starts):
    """Word id per token (as mask_example defines words) and which words are candidates."""
    cand = candidates_of(tokens, seg)
    s = starts.copy()
    s[0] = True
    s[1:] |= seg[1:] != seg[:-1]
    s |= ~cand
    s[1:] |= ~cand[:-1]
    return np.cumsum(s) - 1, cand


def test_whole_word_masking_selects_complete_words_near_budget():
    shortfalls = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        tokens, seg = make_row(rng, T=300)
        starts = rng.random(len(tokens)) < 0.4  # words of ~2.5 tokens
        out = run(tokens, seg, seed, word_starts=starts)
        sel = out["loss_weights"] > 0
        word, cand = words_of(tokens, seg, starts)
        assert not (sel & ~cand).any()
        # Every word is entirely selected or entirely not.
        n_sel_in_word = np.bincount(word, weights=sel)
        n_in_word = np.bincount(word)
        assert np.all((n_sel_in_word == 0) | (n_sel_in_word == n_in_word))
        budget = max(1, round(0.15 * cand.sum()))
        max_len = n_in_word[np.unique(word[cand])].max()
        assert budget - (max_len - 1) <= sel.sum() <= budget
        shortfalls.append(budget - sel.sum())
    # With short words the greedy fill almost always reaches the budget exactly.
    assert np.mean(np.array(shortfalls) == 0) > 0.9, np.mean(np.array(shortfalls) == 0)


def test_whole_word_masking_spans_tokens_and_takes_a_word_when_none_fits():
    # Two words of 3 tokens; 15% of 6 rounds to 1, which no word fits: one word is taken.
    tokens = np.array([10, 11, 12, 13, 14, 15], np.int32)
    seg = np.ones(6, np.int32)
    starts = np.array([1, 0, 0, 1, 0, 0], bool)
    for seed in range(20):
        sel = run(tokens, seg, seed, word_starts=starts)["loss_weights"] > 0
        assert sel.tolist() in ([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    # A segment change starts a new word even when word_starts says otherwise.
    seg2 = np.array([1, 1, 1, 2, 2, 2], np.int32)
    never = np.zeros(6, bool)
    chosen = {tuple(run(tokens, seg2, s, word_starts=never)["loss_weights"]) for s in range(20)}
    assert chosen == {(1, 1, 1, 0, 0, 0), (0, 0, 0, 1, 1, 1)}


def test_config_errors():
    check_mlm_config(0.15, 0.8, 0.1)
    check_mlm_config(0.15, 1.0, 0.0)
    for args, msg in [((0.0, 0.8, 0.1), "mask rate"), ((1.0, 0.8, 0.1), "mask rate"),
                      ((0.15, -0.1, 0.1), "non-negative"), ((0.15, 0.8, -0.1), "non-negative"),
                      ((0.15, 0.8, 0.3), "exceeds 1")]:
        with pytest.raises(ValueError, match=msg):
            check_mlm_config(*args)
    with pytest.raises(ValueError, match="mask rate"):
        run(np.ones(4, np.int32), np.ones(4, np.int32), 0, mask_rate=1.5)
    with pytest.raises(ValueError, match="equal length"):
        run(np.ones(4, np.int32), np.ones(5, np.int32), 0)


def test_byte_table_is_the_byte_level_alphabet():
    assert len(BYTE_OF_CHAR) == 256
    assert set(BYTE_OF_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_OF_CHAR["Ġ"] == ord(" ") and BYTE_OF_CHAR["Ċ"] == ord("\n")
    assert BYTE_OF_CHAR["ĉ"] == ord("\t") and BYTE_OF_CHAR["Ã"] == 0xC3


def test_word_starts_from_tokenizer():
    texts = ["hello running jumping singing, hello walking\n\tthinking café"] * 50
    tok = train_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens(["<|mask|>"])  # an objective's extra special token
    table = word_starts_from_tokenizer(tok)
    assert table.shape == (tok.get_vocab_size(),) and table.dtype == bool
    vocab = tok.get_vocab()
    assert table[vocab[EOS]] and table[vocab[PAD]] and table[vocab["<|mask|>"]]
    assert table[vocab["Ġhello"]] and table[vocab[","]] and table[vocab["Ċ"]]
    assert table[vocab["ĉ"]]
    assert not table[vocab["ing"]] and not table[vocab["h"]] and not table[vocab["Ã"]]
    assert not table[vocab["©"]]  # 0xA9, a UTF-8 continuation byte: mid-character
    # " hello running, thinking": words " hello", " running", ",", " thinking" -> 4 starts
    # (this tokenizer splits " thinking" as "Ġ" + "thinking", one word of two tokens).
    ids = np.array(tok.encode(" hello running, thinking").ids)
    assert table[ids].sum() == 4, tok.encode(" hello running, thinking").tokens
    # Through mask_example with rate 0.5: whole words only.
    seg = np.ones(len(ids), np.int32)
    out = mask_example(ids, seg, np.random.default_rng(0), mask_rate=0.5, mask_id=1,
                       vocab_size=len(table), special_ids=[0, 1], word_starts=table[ids])
    word = np.cumsum(table[ids] | (np.arange(len(ids)) == 0)) - 1
    n_sel, n_all = np.bincount(word, weights=out["loss_weights"]), np.bincount(word)
    assert np.all((n_sel == 0) | (n_sel == n_all)) and 0 < n_sel.sum() <= round(0.5 * len(ids))
