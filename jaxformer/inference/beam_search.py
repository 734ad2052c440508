"""Beam search for every family, the whole search inside one jitted ``jax.lax.while_loop``.

Reproduces transformers' ``GenerationMixin._beam_search`` (5.x, ``do_sample=False``) step for
step, so that the same weights give the same sequences and ``sequences_scores``:

- Scores are summed log-softmax log-probabilities (float32). At each step every row keeps the
  top ``K = max(2, 1 + number of EOS ids) * num_beams`` (beam, token) continuations of all its
  beams; the best ``num_beams`` of them that did not just end continue.
- A continuation ends at an EOS id or when it reaches ``max_new_tokens``. Only those ranked in
  the top ``num_beams`` of the K become finished hypotheses, scored ``sum of log-probs /
  generated_len ** length_penalty``; ``generated_len`` counts the new tokens with the EOS,
  never the prompt (nor its left padding, nor an encoder-decoder's start token). Each row
  keeps its best ``num_beams`` finished hypotheses.
- A row stops taking hypotheses once none can improve: the best running beam's score divided
  by ``generated_len ** length_penalty`` (``max_new_tokens ** length_penalty`` when
  ``early_stopping="never"`` and ``length_penalty > 0``) is no better than the worst of
  ``num_beams`` finished hypotheses; with ``early_stopping=True`` as soon as it has
  ``num_beams`` of them. The loop ends when every row has stopped or at ``max_new_tokens``.
- Penalized entries get ``-1e9`` added, as in transformers, so even their float32 rounding
  matches.

Letters: B batch, k beams, K candidates per row, N max new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import UserError
from jaxformer.inference.families import Family
from jaxformer.inference.generate import Generator

NEG = -1.0e9  # transformers' penalty for entries that must not be chosen


@dataclasses.dataclass
class Beam:
    """One returned hypothesis."""

    tokens: list[int]  # the new tokens, ending with the EOS id when it stopped at one (as
    # transformers returns it: the EOS's log-probability and length count in the score)
    score: float  # sum of log-probs / len(tokens) ** length_penalty (transformers'
    # sequences_scores)


@dataclasses.dataclass
class _Search:
    """The loop's carry (a pytree: every field an array)."""

    logits: jnp.ndarray  # [B*k, V] next-token logits of each running beam
    state: dict  # the family's cache, B*k rows (row b*k + j: beam j of prompt b)
    run_tokens: jnp.ndarray  # [B, k, N] running beams' new tokens
    run_scores: jnp.ndarray  # [B, k] their summed log-probs, best first
    fin_tokens: jnp.ndarray  # [B, k, N] finished hypotheses, best first
    fin_scores: jnp.ndarray  # [B, k] length-penalized (NEG-ish where none yet)
    fin_lengths: jnp.ndarray  # [B, k] int32 new tokens of each (EOS included)
    finished: jnp.ndarray  # [B, k] bool, the slot holds a finished hypothesis
    open: jnp.ndarray  # [B] bool, the row may still improve (transformers'
    # is_early_stop_heuristic_unsatisfied)
    step: jnp.ndarray  # () int32, new tokens chosen so far
    more: jnp.ndarray  # () bool, the loop goes on


jax.tree_util.register_dataclass(
    _Search, data_fields=[f.name for f in dataclasses.fields(_Search)], meta_fields=[])


def _gather(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """x [B, M, ...], index [B, J] -> x[b, index[b, j], ...] [B, J, ...]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _search_fn(family: Family) -> Callable:
    """The jitted search for one family (prefill, expansion to beams and the loop)."""

    def search(params, tokens, lengths, eos_ids, denoms, early, never_longest, *,
               cache_len: int, num_beams: int, num_candidates: int, max_new: int):
        """early: () bool, early_stopping is True; never_longest: () bool, the heuristic
        assumes max_new tokens (early_stopping="never" and length_penalty > 0). Both traced, so
        that every early_stopping value shares one compilation."""
        k, kk, n = num_beams, num_candidates, max_new
        logits, state, slot = family.prefill(params, tokens, lengths, cache_len)
        b, v = logits.shape
        expand = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
        pad = jnp.zeros((b, k, n), jnp.int32)
        # Only beam 0 is real at the first step (the others are copies): transformers starts
        # them at -1e9 so that the first K continuations all come from beam 0.
        run_scores = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, NEG), (b, k))
        carry = _Search(
            logits=expand(logits), state=jax.tree_util.tree_map(expand, state),
            run_tokens=pad, run_scores=run_scores.astype(jnp.float32), fin_tokens=pad,
            fin_scores=jnp.full((b, k), NEG, jnp.float32),
            fin_lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
            open=jnp.ones((b,), bool), step=jnp.zeros((), jnp.int32),
            more=jnp.ones((), bool))
        top_beams = jnp.arange(kk)[None, :] < k  # [1, K]: the candidates that may be stored
        rows = jnp.arange(b)[:, None] * k  # [B, 1]: each prompt's first flat beam row

        def body(c: _Search) -> _Search:
            t = c.step
            logp = jax.nn.log_softmax(c.logits.astype(jnp.float32), axis=-1)
            logp = (logp.reshape(b, k, v) + c.run_scores[:, :, None]).reshape(b, k * v)
            cand_scores, flat = jax.lax.top_k(logp, kk)  # [B, K], best first
            parent, token = flat // v, (flat % v).astype(jnp.int32)
            cand_tokens = _gather(c.run_tokens, parent).at[:, :, t].set(token)  # [B, K, N]
            ends = jnp.isin(token, eos_ids) | (t + 1 >= n)

            # The best k continuations that did not end run on.
            running = cand_scores + ends.astype(jnp.float32) * NEG
            keep = jax.lax.top_k(running, k)[1]
            run_tokens, run_scores = _gather(cand_tokens, keep), _gather(running, keep)
            run_parent = _gather(parent, keep)

            # Those that ended among the top k join the finished ones if they score better.
            stored = ends & top_beams
            scores = cand_scores / denoms[t]
            # With early stopping, a row with k finished hypotheses takes no more.
            full = jnp.all(c.finished, axis=1, keepdims=True) & early
            scores += full.astype(jnp.float32) * NEG
            scores += (~c.open)[:, None].astype(jnp.float32) * NEG
            scores += (~stored).astype(jnp.float32) * NEG
            merged = jnp.concatenate([c.fin_scores, scores], axis=1)
            best = jax.lax.top_k(merged, k)[1]
            fin_tokens = _gather(jnp.concatenate([c.fin_tokens, cand_tokens], axis=1), best)
            lengths = jnp.concatenate(
                [c.fin_lengths, jnp.broadcast_to(t + 1, (b, kk)).astype(jnp.int32)], axis=1)
            fin_lengths = _gather(lengths, best)
            finished = _gather(jnp.concatenate([c.finished, stored], axis=1), best)
            fin_scores = _gather(merged, best)

            # Can a running beam still beat the worst finished hypothesis? (transformers'
            # heuristic: the best running beam, penalized at its current length.)
            hypothetical = jnp.where(never_longest, denoms[n - 1], denoms[t])
            best_running = run_scores[:, :1] / hypothetical
            worst = jnp.where(finished, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
            still_open = c.open & jnp.any(best_running > worst, axis=1)
            more = jnp.any(still_open) & ~jnp.all(ends) & ~(jnp.all(finished) & early)

            def advance(state):
                # Each running beam takes its parent's cache, then reads its new token.
                order = (rows + run_parent).reshape(-1)
                state = jax.tree_util.tree_map(lambda x: x[order], state)
                logits, state = family.step(params, run_tokens[:, :, t].reshape(b * k, 1),
                                            state, slot + t)
                return logits[:, -1].astype(c.logits.dtype), state

            # No forward pass after the last step.
            logits, state = jax.lax.cond(more, advance, lambda s: (c.logits, s), c.state)
            return _Search(logits=logits, state=state, run_tokens=run_tokens,
                           run_scores=run_scores, fin_tokens=fin_tokens,
                           fin_scores=fin_scores, fin_lengths=fin_lengths, finished=finished,
                           open=still_open, step=t + 1, more=more)

        out = jax.lax.while_loop(lambda c: c.more, body, carry)
        return out.fin_tokens, out.fin_scores, out.fin_lengths, out.finished

    static = ("cache_len", "num_beams", "num_candidates", "max_new")
    return jax.jit(search, static_argnames=static)


# One compiled search per family object, dropped with it.
_COMPILED: weakref.WeakKeyDictionary[Any, Callable] = weakref.WeakKeyDictionary()


def _compiled(family: Family) -> Callable:
    if family not in _COMPILED:
        _COMPILED[family] = _search_fn(family)
    return _COMPILED[family]


def beam_search(family: Family, params: Any, prompts: Sequence[Sequence[int]], *,
                num_beams: int, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1) -> list[list[Beam]]:
    """B prompts (token ids, any lengths; an encoder-decoder's sources) -> for each, its
    ``num_return_sequences`` best finished hypotheses, best first, as transformers'
    ``generate(num_beams=num_beams, do_sample=False, ...)`` returns them.

    eos_ids: the ids that end a hypothesis (may be empty: every hypothesis then runs to
    ``max_new_tokens``). pad_id: pads the prompts (never attended to). early_stopping: True
    (stop a row at num_beams finished hypotheses), False (stop it when transformers' heuristic
    says no running beam can do better) or "never" (the same with the most optimistic length
    when length_penalty > 0). Unlike transformers, num_beams=1 is a beam search too (K = 2
    candidates), not greedy decoding.
    """
    vocab = family.vocab_size
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or \
            not 1 <= num_return_sequences <= num_beams:
        raise UserError(f"num_return_sequences must be between 1 and num_beams ({num_beams}), "
                        f"got {num_return_sequences!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, bool | str):
        raise UserError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not math.isfinite(length_penalty):
        raise UserError(f"length_penalty must be finite, got {length_penalty!r}")
    eos = sorted({int(e) for e in eos_ids})  # a repeated id would only widen K
    for t in [*eos, pad_id]:
        if not 0 <= t < vocab:
            raise UserError(f"token id {t} (an EOS or the pad id) is outside the vocabulary "
                            f"[0, {vocab})")
    num_candidates = max(2, 1 + len(eos)) * num_beams
    if num_candidates > num_beams * vocab:
        raise UserError(f"{num_beams} beams with {len(eos)} EOS ids need {num_candidates} "
                        f"candidates per step, more than beams x vocabulary")
    batch = family.pack(prompts, pad_id)  # token ids checked against the vocabulary, or waves
    cache_len = family.cache_len(batch.tokens.shape[1], max_new_tokens)
    # generated_len ** length_penalty for generated_len = 1 .. N, computed in float64 and
    # rounded once, as transformers' Python scalar is.
    denoms = np.arange(1, max_new_tokens + 1, dtype=np.float64) ** float(length_penalty)
    tokens, scores, lengths, _finished = _compiled(family)(
        params, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
        jnp.asarray(eos or [-1], jnp.int32), jnp.asarray(denoms, jnp.float32),
        jnp.asarray(early_stopping is True),
        jnp.asarray(early_stopping == "never" and length_penalty > 0),
        cache_len=cache_len, num_beams=num_beams, num_candidates=num_candidates,
        max_new=max_new_tokens)
    # Every row ends with num_beams finished hypotheses: a row closes only once it has them,
    # and the last step ends every candidate (the top num_beams are stored).
    tokens, scores, lengths = (np.asarray(x) for x in (tokens, scores, lengths))
    return [[Beam([int(x) for x in tokens[r, j, :lengths[r, j]]], float(scores[r, j]))
             for j in range(num_return_sequences)] for r in range(len(prompts))]


def best_sequences(family: Family, params: Any, prompts: Sequence[Any], max_new_tokens: int, *,
                   eos_id: int, pad_id: int, num_beams: int = 1, length_penalty: float = 1.0,
                   generator: Generator | None = None) -> list[list[int]]:
    """Each prompt's decoded tokens (its EOS not included): greedy with ``num_beams`` 1 (through
    ``generator``, a greedy ``Generator`` of ``family`` reused across calls, or a new one), else
    the best hypothesis of a beam search. What transcribing and captioning share."""
    if num_beams > 1:
        beams = beam_search(family, params, list(prompts), num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_ids=[eos_id], pad_id=pad_id,
                            length_penalty=length_penalty)
        return [b[0].tokens for b in beams]
    if generator is None:
        generator = Generator(family, params, pad_id=pad_id)
    return [g.tokens for g in generator.generate(list(prompts), max_new_tokens,
                                                 stop_tokens=[eos_id])]
