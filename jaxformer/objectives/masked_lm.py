"""Masked-LM (BERT, Devlin et al. 2019) corruption of one packed row, in numpy on the host.

A fraction of the real tokens is selected for prediction; of those, most are replaced by a
mask token, some by a random token and some left as they are. The model (an encoder that
attends both ways within a segment) predicts the original token at the selected positions
only. Whole-word masking selects whole words instead of single tokens.

Letters: T row length, V vocabulary size, N candidate tokens, W candidate words, K selected
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.config import Config
from jaxformer.data.tokenizer_kinds import BYTE_OF_CHAR, MASK_ROLE, word_starts
from jaxformer.objectives import tasks
from jaxformer.objectives.base import Batch, Log, Objective, Task
from jaxformer.objectives.registry import register

__all__ = ["BYTE_OF_CHAR", "MaskedLM", "check_mlm_config", "mask_example", "segment_positions",
           "word_starts_from_tokenizer"]


def check_mlm_config(mask_rate: float, mask_token_prob: float, random_token_prob: float) -> None:
    """ValueError (one line) unless 0 < mask_rate < 1 and the two replacement probabilities
    are non-negative and sum to at most 1 (the rest is the keep-unchanged probability)."""
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"masked-LM mask rate must be in (0, 1), got {mask_rate}")
    if mask_token_prob < 0 or random_token_prob < 0:
        raise ValueError(
            f"masked-LM replacement probabilities must be non-negative, got mask-token "
            f"{mask_token_prob} and random-token {random_token_prob}"
        )
    if mask_token_prob + random_token_prob > 1.0 + 1e-9:
        raise ValueError(
            f"masked-LM mask-token probability {mask_token_prob} + random-token probability "
            f"{random_token_prob} = {mask_token_prob + random_token_prob} exceeds 1"
        )


def word_starts_from_tokenizer(tokenizer: Any) -> np.ndarray:
    """[V] bool: True for the tokens that begin a word, by the word boundaries of the
    tokenizer's kind (``jaxformer.data.tokenizer_kinds.word_starts``): for a byte-level BPE,
    a token whose first byte is not an ASCII letter or digit (a space "Ġ", newline "Ċ", tab
    "ĉ", punctuation); for WordPiece, a piece without ``##``; for Unigram, a piece with ``▁``.
    Special (added) tokens begin a word.

    Use it as `word_starts = table[tokens]`; `mask_example` also makes the first token of
    every segment a start, so a document never continues a word of the previous one.
    """
    return word_starts(tokenizer)


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """[T] int32 position of every token within its run of equal segment ids (0 at each start).

    segment_ids: [T] int. Padding runs (id 0) count from 0 too; they carry no loss.
    """
    seg = np.asarray(segment_ids)
    T = len(seg)
    col = np.arange(T, dtype=np.int32)
    starts = np.ones(T, dtype=bool)
    starts[1:] = seg[1:] != seg[:-1]
    run_start = np.maximum.accumulate(np.where(starts, col, 0)) if T else col
    return (col - run_start).astype(np.int32)


def _random_non_special(rng: np.random.Generator, n: int, vocab_size: int,
                        special: np.ndarray) -> np.ndarray:
    """[n] int32 ids drawn uniformly from [0, vocab_size) minus the sorted unique `special`.

    Draws from the V - |special| ordinary ids and skips over each special id in turn, so no
    [V]-sized table is built per example.
    """
    ids = rng.integers(0, vocab_size - len(special), size=n, dtype=np.int64)
    for s in special:  # ascending: each shift can only push an id past later specials
        ids += ids >= s
    return ids.astype(np.int32)


def _select_whole_words(candidates: np.ndarray, word_starts: np.ndarray, segment_ids: np.ndarray,
                        budget: int, rng: np.random.Generator) -> np.ndarray:
    """[K] sorted positions of whole words chosen as in BERT's `create_pretraining_data`.

    candidates, word_starts: [T] bool; segment_ids: [T] int. Words are shuffled and added in
    order while they fit in the budget (a word that would overshoot is skipped, a later shorter
    one may still fit), so K <= budget. Unlike BERT, when no word fits (every word longer than
    the budget) the first shuffled word is taken anyway: an example with candidates should
    never end up with nothing to predict.
    """
    T = len(candidates)
    # A word boundary at every marked start, every segment change, and around every
    # non-candidate token, so a word never spans documents and never includes a special token.
    is_start = np.asarray(word_starts, dtype=bool).copy()
    is_start[0] = True
    is_start[1:] |= segment_ids[1:] != segment_ids[:-1]
    is_start |= ~candidates
    is_start[1:] |= ~candidates[:-1]
    word_of = np.cumsum(is_start) - 1  # [T] word index of every token
    word_first = np.flatnonzero(is_start)  # [W_all]
    word_len = np.diff(np.append(word_first, T))
    cand_words = np.flatnonzero(candidates[word_first])  # a word is all candidates or one token
    order = rng.permutation(cand_words)  # [W]
    lens = word_len[order]

    # Vectorized for the leading words that all fit, then the greedy loop for the remainder.
    fits = int(np.searchsorted(np.cumsum(lens), budget, side="right"))
    chosen = list(order[:fits])
    total = int(lens[:fits].sum())
    for w, n in zip(order[fits:], lens[fits:], strict=True):
        if total >= budget:
            break
        if total + n <= budget:
            chosen.append(w)
            total += int(n)
    if not chosen and len(order):
        chosen = [order[0]]
    return np.flatnonzero(np.isin(word_of, chosen))


def mask_example(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_rate: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    word_starts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Corrupt one row of tokens for masked-LM training.

    tokens: [T] int token ids (a packed row's `inputs`); segment_ids: [T] int, 1-based document
    id, 0 for padding; rng: the generator all draws come from (same seed -> same result);
    special_ids: ids never selected nor drawn as random replacements (EOS, PAD, mask_id, ...;
    mask_id is added if missing); word_starts: [T] bool, True where a token begins a word
    (e.g. `word_starts_from_tokenizer(tok)[tokens]`), for whole-word masking.

    Candidates are the N real (segment id > 0), non-special tokens. Exactly
    K = round(mask_rate * N) of them are selected (Python's round: half to even), at least 1
    when N > 0, uniformly without replacement. With `word_starts`, whole words are selected
    instead until K tokens are reached (see `_select_whole_words`; then K is at most the
    budget). Each selected token independently becomes mask_id with probability
    mask_token_prob, a random non-special token with probability random_token_prob, and stays
    unchanged otherwise (BERT's 80/10/10). As in BERT, this decision is made per token even with
    whole-word masking, so a word can be partly masked and partly kept.

    Returns {"inputs", "targets", "segment_ids", "positions"} [T] int32 and "loss_weights"
    [T] float32: inputs is the corrupted row, targets the original tokens everywhere (the
    loss weights pick the selected positions), positions restart at 0 in every segment.
    """
    check_mlm_config(mask_rate, mask_token_prob, random_token_prob)
    tokens = np.asarray(tokens)
    segment_ids = np.asarray(segment_ids)
    if tokens.ndim != 1 or segment_ids.shape != tokens.shape:
        raise ValueError(
            f"tokens and segment_ids must be 1-D of equal length, got shapes {tokens.shape} "
            f"and {segment_ids.shape}"
        )
    if word_starts is not None and np.shape(word_starts) != tokens.shape:
        raise ValueError(f"word_starts must have shape {tokens.shape}, got {np.shape(word_starts)}")
    special = np.unique(np.append(np.asarray(special_ids, dtype=np.int64), mask_id))
    special = special[(special >= 0) & (special < vocab_size)]
    if random_token_prob > 0 and len(special) >= vocab_size:
        raise ValueError(f"no non-special token to draw from a vocabulary of {vocab_size}")

    candidates = (segment_ids > 0) & ~np.isin(tokens, special)
    n_candidates = int(candidates.sum())
    budget = max(1, round(mask_rate * n_candidates)) if n_candidates else 0
    if budget == 0:
        selected = np.zeros(0, dtype=np.int64)
    elif word_starts is None:
        selected = np.sort(rng.choice(np.flatnonzero(candidates), size=budget, replace=False))
    else:
        selected = _select_whole_words(candidates, word_starts, segment_ids, budget, rng)

    # One uniform draw per selected token decides its fate: [0, p_mask) -> mask token,
    # [p_mask, p_mask + p_random) -> random token, the rest -> unchanged.
    u = rng.random(len(selected))
    to_mask = selected[u < mask_token_prob]
    to_random = selected[(u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)]
    inputs = tokens.astype(np.int32, copy=True)
    inputs[to_mask] = mask_id
    inputs[to_random] = _random_non_special(rng, len(to_random), vocab_size, special)

    loss_weights = np.zeros(len(tokens), dtype=np.float32)
    loss_weights[selected] = 1.0
    return {
        "inputs": inputs,
        "targets": tokens.astype(np.int32, copy=True),
        "segment_ids": segment_ids.astype(np.int32, copy=True),
        "positions": segment_positions(segment_ids),
        "loss_weights": loss_weights,
    }


@register
class MaskedLM(Objective):
    """BERT's masked-LM on packed documents, for an encoder."""

    name = "masked_lm"
    arch = "encoder"
    special_roles = (MASK_ROLE,)

    def check(self, cfg: Config) -> None:
        o = cfg.objective
        check_mlm_config(o.mask_rate, o.mask_token_prob, o.random_token_prob)

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        pipeline = tasks.text_pipeline(cfg, tokenizer_path, log)
        tok, o = pipeline.tokenizer, cfg.objective
        mask_id = tasks.role_token_ids(tok, MASK_ROLE, self.name)[0]
        specials = tasks.special_ids(tok)
        starts = word_starts_from_tokenizer(tok) if o.whole_word else None

        def mask(row: Batch, rng: np.random.Generator) -> Batch:
            return mask_example(
                row["inputs"], row["segment_ids"], rng, mask_rate=o.mask_rate,
                mask_token_prob=o.mask_token_prob, random_token_prob=o.random_token_prob,
                mask_id=mask_id, vocab_size=tok.get_vocab_size(), special_ids=specials,
                word_starts=None if starts is None else starts[row["inputs"]])

        return tasks.text_task(cfg, pipeline, mask)
