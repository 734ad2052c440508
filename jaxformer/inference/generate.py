"""Batched generation for every family, the whole token loop inside one jitted function.

``Generator.generate`` takes a batch of prompts of different lengths and returns each row's
new tokens; rows finish independently (at a stop token or a stop string) and the loop ends
when all have. ``Generator.stream`` runs the same compiled loop a chunk of steps at a time and
yields the tokens as they come. Stop strings are matched on the text between chunks (the
device never sees text); a row that matched is cut at the match and stops there.

Letters: B batch, P prompt width, N max new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import UserError
from jaxformer.inference.families import Family
from jaxformer.inference.processors import (
    SamplingParams,
    check_token_ids,
    sample_token,
    stop_mask,
)

if TYPE_CHECKING:
    from jaxformer.inference.prompt_cache import PromptCache

STREAM_CHUNK = 8  # steps per jitted call when streaming or matching stop strings
GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass
class Generation:
    """One row's result."""

    tokens: list[int]  # the new tokens, without the stop token or stop string
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens)
    text: str | None = None  # the decoded tokens, when the generator has a decode function


@dataclasses.dataclass
class _Loop:
    """The loop's carry (a pytree: every field an array)."""

    out: jnp.ndarray  # [B, N] new tokens (pad after a row finished)
    history: jnp.ndarray  # [B, H + N] prompt then new tokens, for the logits processors
    offsets: jnp.ndarray  # [B] left padding of history
    logits: jnp.ndarray  # [B, V] next-token logits
    state: dict  # the family's cache
    length: jnp.ndarray  # [B] int32, new tokens kept (a stop token is not)
    done: jnp.ndarray  # [B] bool
    stopped: jnp.ndarray  # [B] bool, finished at a stop token (not the length)
    step: jnp.ndarray  # () int32, tokens generated so far


jax.tree_util.register_dataclass(_Loop, data_fields=[f.name for f in dataclasses.fields(_Loop)],
                                 meta_fields=[])


class Generator:
    """Generates from one model's parameters with one family's decoding hooks.

    decode: token ids -> text (a tokenizer's), needed for stop strings and ``Generation.text``.
    """

    def __init__(self, family: Family, params: Any, *, pad_id: int = 0,
                 decode: Callable[[list[int]], str] | None = None):
        self.family, self.params, self.pad_id, self.decode = family, params, pad_id, decode

    @functools.cached_property
    def _start(self) -> Callable:
        family = self.family

        def start(params, tokens, lengths, prefix, cache_len, max_new):
            b = tokens.shape[0]
            if prefix is None:
                logits, state, slot = family.prefill(params, tokens, lengths, cache_len)
                history, offsets = family.history(tokens, lengths)
            else:  # a cached prompt prefix: its ids [B, C] and its cache
                prefix_ids, prefix_kv = prefix
                logits, state, slot = family.prefill_cached(params, prefix_kv, tokens,
                                                            cache_len)
                history = jnp.concatenate([prefix_ids, tokens], axis=1)
                offsets = jnp.zeros((b,), jnp.int32)
            history = jnp.concatenate([history, jnp.zeros((b, max_new), jnp.int32)], axis=1)
            loop = _Loop(out=jnp.full((b, max_new), self.pad_id, jnp.int32), history=history,
                         offsets=offsets, logits=logits, state=state,
                         length=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                         stopped=jnp.zeros((b,), bool), step=jnp.zeros((), jnp.int32))
            return loop, slot

        return jax.jit(start, static_argnums=(4, 5))

    @functools.cached_property
    def _run(self) -> Callable:
        family = self.family

        def run(params, loop: _Loop, limit, key, is_stop, first_slot,
                sampling: SamplingParams):
            b, width = loop.history.shape
            n = loop.out.shape[1]
            p = width - n
            cols = jnp.arange(width)

            def body(c: _Loop) -> _Loop:
                valid = (cols[None, :] >= c.offsets[:, None]) & (cols[None, :] < p + c.step)
                tok = sample_token(c.logits, jax.random.fold_in(key, c.step), sampling,
                                   c.history, valid)
                hit = is_stop[tok] & ~c.done
                tok = jnp.where(c.done, self.pad_id, tok)
                keep = ~c.done & ~hit
                out = c.out.at[:, c.step].set(jnp.where(keep, tok, self.pad_id))
                history = c.history.at[:, p + c.step].set(tok)
                logits, state = family.step(params, tok[:, None], c.state, first_slot + c.step)
                step = c.step + 1
                return dataclasses.replace(
                    c, out=out, history=history, logits=logits[:, -1], state=state,
                    length=c.length + keep, done=c.done | hit | (step >= n),
                    stopped=c.stopped | hit, step=step)

            def cond(c: _Loop) -> jnp.ndarray:
                return (c.step < limit) & ~jnp.all(c.done)

            return jax.lax.while_loop(cond, body, loop)

        return jax.jit(run, static_argnums=(6,), donate_argnums=(1,))

    def _prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams, stop_tokens: Sequence[int],
                 prefix: PromptCache | None):
        sampling.check()
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        vocab = self.family.vocab_size
        check_token_ids([], stop_tokens, vocab)  # the prompts: the family's ``pack``
        cached = None
        if prefix is not None:
            if len(prompts) != 1:
                raise UserError("a prompt cache continues one prompt at a time")
            # The prefix's last token runs again: its logits start the continuation.
            prompts = [[prefix.tokens[-1], *prompts[0]]]
            cached = (jnp.asarray([prefix.tokens[:-1]], jnp.int32),
                      [{k: jnp.asarray(v) for k, v in layer.items()} for layer in prefix.kv])
        batch = self.family.pack(prompts, self.pad_id)
        width = batch.tokens.shape[1] + (0 if prefix is None else len(prefix.tokens) - 1)
        cache_len = self.family.cache_len(width, max_new_tokens)
        loop, slot = self._start(self.params, jnp.asarray(batch.tokens),
                                 jnp.asarray(batch.lengths), cached, cache_len, max_new_tokens)
        # A [V] mask rather than a list: any number of stop tokens runs the same compiled loop.
        return loop, (stop_mask(stop_tokens, vocab), jnp.asarray(slot, jnp.int32))

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: SamplingParams = GREEDY, *,
               stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
               seed: int = 0, chunk: int = STREAM_CHUNK,
               prefix: PromptCache | None = None) -> Iterator[list[list[int]]]:
        """Yields, after every ``chunk`` steps, each row's tokens new since the last yield
        (a row that finished yields nothing more). The concatenation of the yields is what
        ``generate`` returns (the tokens, without the stop token or string)."""
        rows = self._rows(prompts, max_new_tokens, sampling, stop_tokens, stop_strings, seed,
                          chunk, prefix)
        sent = [0] * len(prompts)
        for snapshot, final in rows:
            new = []
            for r, gen in enumerate(snapshot):
                # Hold back text that may still become a stop string (a prefix of one).
                safe = len(gen.tokens) if final else self._safe_length(gen, stop_strings)
                new.append(gen.tokens[sent[r]:safe])
                sent[r] = max(sent[r], safe)
            yield new

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = GREEDY, *,
                 stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 seed: int = 0, prefix: PromptCache | None = None) -> list[Generation]:
        """prompts: B lists of token ids (any lengths) -> B generations. Without stop
        strings the whole loop is one device call. prefix: a cached prompt prefix
        (``inference.prompt_cache``) that the one prompt continues."""
        chunk = STREAM_CHUNK * 4 if stop_strings else max_new_tokens
        rows: list[Generation] = []
        for rows, _final in self._rows(prompts, max_new_tokens, sampling, stop_tokens,  # noqa: B007
                                       stop_strings, seed, chunk, prefix):
            pass  # the last yield holds every row's result
        return rows

    def _rows(self, prompts, max_new_tokens, sampling, stop_tokens, stop_strings, seed, chunk,
              prefix) -> Iterator[tuple[list[Generation], bool]]:
        """Runs the loop ``chunk`` steps at a time -> (every row so far, whether finished)."""
        if stop_strings and self.decode is None:
            raise UserError("stop strings need a tokenizer to decode the tokens")
        if any(not s for s in stop_strings):
            raise UserError("a stop string is empty")
        loop, consts = self._prepare(prompts, max_new_tokens, sampling, stop_tokens, prefix)
        key = jax.random.key(seed)
        b = len(prompts)
        cut: list[Generation | None] = [None] * b  # rows ended by a stop string
        while True:
            loop = self._run(self.params, loop, loop.step + chunk, key, *consts, sampling)
            out, length, done, stopped = (np.asarray(x) for x in (
                loop.out, loop.length, loop.done, loop.stopped))
            rows = []
            for r in range(b):
                ids = [int(t) for t in out[r, :length[r]]]
                if cut[r] is None and stop_strings:
                    cut[r] = self._match_stop(ids, stop_strings)
                rows.append(cut[r] or Generation(
                    ids, ("stop" if stopped[r] else "length") if done[r] else "",
                    self.decode(ids) if self.decode is not None else None))
            finished = all(c is not None or d for c, d in zip(cut, done, strict=True))
            if stop_strings and not finished:
                ended = jnp.asarray([c is not None for c in cut])
                loop = dataclasses.replace(loop, done=loop.done | ended)
            yield rows, finished
            if finished:
                return

    def _match_stop(self, ids: list[int], stop_strings: Sequence[str]) -> Generation | None:
        """The row cut before its first stop string, or None when it has none yet: the
        shortest token prefix whose text reaches the match, its text cut at the match."""
        text = self.decode(ids)
        hits = [text.find(s) for s in stop_strings if s in text]
        if not hits:
            return None
        end = min(hits)
        keep = len(ids)
        while keep > 0 and len(self.decode(ids[:keep - 1])) >= end:
            keep -= 1
        return Generation(ids[:keep], "stop", self.decode(ids[:keep])[:end])

    def _safe_length(self, gen: Generation, stop_strings: Sequence[str]) -> int:
        """How many of a running row's tokens may be streamed: those whose text ends before
        the last (longest stop string - 1) characters, which may yet begin a stop string."""
        if not stop_strings:
            return len(gen.tokens)
        limit = len(self.decode(gen.tokens)) - (max(map(len, stop_strings)) - 1)
        keep = len(gen.tokens)
        while keep > 0 and len(self.decode(gen.tokens[:keep])) > limit:
            keep -= 1
        return keep
