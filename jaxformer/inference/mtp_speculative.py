"""Self-speculative greedy decoding with a model's own multi-token-prediction modules
(``model.mtp_heads``; Gloeckle et al. 2024, "Better & Faster Large Language Models via
Multi-token Prediction"; DeepSeek-V3): no draft model. Each main-model call both verifies the
previous round's proposals and yields the hidden states from which the MTP modules propose the
next ones, so a round costs one main ``decode`` call (T = n + 1) plus the n one-block MTP
modules, and produces 1 .. n + 1 tokens.

One round, with the decided sequence ``x[0 .. L-1]`` whose last token ``x[L-1]`` (the pending
token) is not in the main cache yet, and proposals ``d_1 .. d_n`` for positions L .. L+n-1:

1. Verify: the main model decodes ``x[L-1], d_1 .. d_n`` at slots L-1 .. L+n-1 in one call:
   its argmax ``a_j`` for the token at L + j (j = 0 .. n). ``d_i`` is kept while it equals
   ``a_{i-1}``: m tokens accepted; the token at L + m is ``a_m`` (the correction, or the bonus
   token when all n were kept). The new length is L' = L + m + 1. This is exactly greedy
   decoding: every decided token is the main model's argmax after the tokens before it.
2. Propose: MTP depth k at position i takes depth k-1's hidden state at i (depth 0: the main
   model's last block output) and the embedding of token i + k, and predicts token i + k + 1.
   From position L' - 2 (the last one whose main hidden state is now known) depth k proposes
   the token at L' - 1 + k, and feeds depth k + 1 (whose input token at L' - 2 is that
   proposal). Each depth has its own block cache; its entry at position j depends on the
   token j + k, which may have been a proposal when it was written, so each round recomputes
   the positions from L - n (L: the length before this round) to L' - 2 in one fixed-shape
   block of 2n positions; entries below L - n were written with decided tokens only.
3. Nothing is rolled back: cache slots and hidden states past the decided tokens hold rejected
   work that the decode mask hides (a query sees only slots <= its own) and that later rounds
   overwrite, as in ``jaxformer.inference.speculative``.

The first token comes from the prefill's logits, and the prefill's hidden states fill the MTP
caches and give the first proposals. Batch 1, greedy only; the whole loop is one
``jax.lax.while_loop`` in one ``jax.jit``.

Letters: P prompt length, N max new tokens, n MTP depths, V vocabulary, D model width,
W the token buffer, C cache slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.processors import check_token_ids, stop_mask
from jaxformer.inference.speculative import SpeculativeStats


@dataclasses.dataclass
class _Carry:
    """The loop's carry (a pytree: every field an array). Batch 1: no batch axis on seq."""

    seq: jnp.ndarray  # [W] int32: prompt, decided tokens, then the proposals after them
    length: jnp.ndarray  # () int32, decided tokens of seq (the last one is pending)
    cache: list  # the main model's cache
    mtp_cache: list  # one block cache per MTP depth
    hidden: jnp.ndarray  # [W, D] the main model's last-block output by position
    done: jnp.ndarray  # () bool
    rounds: jnp.ndarray  # () int32
    accepted: jnp.ndarray  # () int32


jax.tree_util.register_dataclass(
    _Carry, data_fields=[f.name for f in dataclasses.fields(_Carry)], meta_fields=[])


def buffer_sizes(prompt_len: int, max_new_tokens: int, n: int) -> tuple[int, int]:
    """-> (W token-buffer length, C cache slots). A round starts at L <= P + N - 1: its verify
    call writes slots up to L + n - 1 and its MTP block slots max(L - n, 0) .. + 2n - 1; it
    reads tokens up to max(L - n, 0) + 3n - 1 and writes proposals up to L + 2n."""
    p, big_n = prompt_len, max_new_tokens
    return max(p + big_n + 2 * n, 3 * n), max(p + big_n + n - 1, 2 * n)


def mtp_loop(family: DecoderFamily, params: Any, prompt: jnp.ndarray, is_stop: jnp.ndarray,
             *, max_new_tokens: int) -> tuple[jnp.ndarray, ...]:
    """The traceable loop (``mtp_generate`` jits and checks it): prompt [P] int32, is_stop [V]
    bool -> (new [W - P] int32: the decided tokens first, then leftovers; count () int32, how
    many are decided (may exceed N and run past a stop token: cut on the host); rounds;
    accepted proposals)."""
    model = nnx.merge(family.graphdef, family.unpack(params))
    n = model.cfg.mtp_heads
    P, N = prompt.shape[0], max_new_tokens
    W, C = buffer_sizes(P, N, n)
    cols = jnp.arange(W)
    offsets = jnp.zeros((1,), jnp.int32)

    def propose(seq, hidden, mtp_cache, start, width, last):
        """MTP depths 1 .. n over positions start .. start + width - 1, whose main hidden
        states up to ``last`` (= L' - 2) are final -> (seq with the proposals for L' .. L'+n-1,
        the updated caches)."""
        h = jax.lax.dynamic_slice(hidden, (start, 0), (width, hidden.shape[1]))[None]
        new_cache = []
        for k in range(1, n + 1):
            toks = jax.lax.dynamic_slice(seq, (start + k,), (width,))[None]  # token j + k
            logits, h, layer = model.mtp_decode(k, h, toks, mtp_cache[k - 1], start,
                                                offsets=offsets)
            new_cache.append(layer)
            guess = jnp.argmax(logits[0, last - start]).astype(jnp.int32)
            seq = seq.at[last + k + 1].set(guess)  # depth k's token after ``last``
        return seq, new_cache

    logits, cache, hid = model.decode(prompt[None].astype(jnp.int32), model.init_cache(1, C),
                                      jnp.zeros((), jnp.int32), offsets=offsets,
                                      return_hidden=True)
    first = jnp.argmax(logits[0, -1]).astype(jnp.int32)
    seq = jnp.zeros((W,), jnp.int32).at[:P].set(prompt).at[P].set(first)
    hidden = jnp.zeros((W, hid.shape[-1]), hid.dtype).at[:P].set(hid[0])
    seq, mtp_cache = propose(seq, hidden, model.init_mtp_cache(1, C), jnp.zeros((), jnp.int32),
                             P, jnp.asarray(P - 1, jnp.int32))
    carry = _Carry(seq=seq, length=jnp.asarray(P + 1, jnp.int32), cache=cache,
                   mtp_cache=mtp_cache, hidden=hidden, done=is_stop[first] | (N <= 1),
                   rounds=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))

    def body(c: _Carry) -> _Carry:
        L = c.length
        block = jax.lax.dynamic_slice(c.seq, (L - 1,), (n + 1,))[None]  # pending, d_1 .. d_n
        logits, cache, hid = model.decode(block, c.cache, L - 1, offsets=offsets,
                                          return_hidden=True)
        best = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)  # [n + 1]: tokens L .. L+n
        ok = jax.lax.dynamic_slice(c.seq, (L,), (n,)) == best[:n]
        m = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        seq = c.seq.at[L + m].set(best[m])  # L .. L+m-1 already hold the accepted d_i
        hidden = jax.lax.dynamic_update_slice(c.hidden, hid[0], (L - 1, 0))
        length = L + m + 1
        seq, mtp_cache = propose(seq, hidden, c.mtp_cache, jnp.maximum(L - n, 0), 2 * n,
                                 length - 2)
        new = (cols >= L) & (cols < length)
        hit = jnp.any(is_stop[seq] & new)
        return _Carry(seq=seq, length=length, cache=cache, mtp_cache=mtp_cache, hidden=hidden,
                      done=hit | (length - P >= N), rounds=c.rounds + 1,
                      accepted=c.accepted + m)

    c = jax.lax.while_loop(lambda c: ~c.done, body, carry)
    return c.seq[P:], c.length - P, c.rounds, c.accepted


_run = jax.jit(mtp_loop, static_argnames=("family", "max_new_tokens"))


def check_mtp(family: Any, prompt_len: int, max_new_tokens: int) -> None:
    """Raises UserError when ``family`` cannot decode with its MTP modules or the request does
    not fit its context."""
    if not isinstance(family, DecoderFamily) or family.prefix_lm:
        raise UserError("self-speculative (MTP) decoding needs a causal decoder-only model, got "
                        f"{getattr(family, 'kind', type(family).__name__)!r}"
                        f"{' (prefix-LM)' if getattr(family, 'prefix_lm', False) else ''}")
    family.require_slot_cache("self-speculative (MTP) decoding")
    n = family.cfg.mtp_heads
    if n < 1:
        raise UserError("self-speculative decoding needs a model trained with MTP modules "
                        "(model.mtp_heads > 0); this one has none")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise UserError("the prompt needs at least one token")
    _, slots = buffer_sizes(prompt_len, max_new_tokens, n)
    if slots > family.cfg.max_len:
        raise UserError(
            f"the prompt ({prompt_len} tokens) + max new tokens ({max_new_tokens}) + "
            f"mtp_heads - 1 ({n - 1}, the last round's lookahead) = {slots} exceeds the "
            f"model's context (model.max_len {family.cfg.max_len})")


def mtp_generate(family: DecoderFamily, params: Any, prompt: Sequence[int], *,
                 max_new_tokens: int, stop_tokens: Sequence[int] = ()
                 ) -> tuple[list[int], SpeculativeStats]:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``prompt`` (batch 1), the
    model's MTP modules proposing ``model.mtp_heads`` tokens per round -> (the new tokens,
    without the stop token, as ``Generator.generate`` returns them; the stats: a round is one
    main-model call after the prefill, ``proposed`` = rounds * mtp_heads,
    ``tokens_per_target_call`` the tokens per main-model call).

    The tokens are the main model's greedy ones, as ``Generator`` decodes them (up to float
    rounding between a T = mtp_heads + 1 and a T = 1 call at near-ties); the MTP modules only
    change how many come per call. The caches hold max(P + max_new_tokens + mtp_heads - 1,
    2 * mtp_heads) slots, which must fit model.max_len.
    """
    prompt = [int(t) for t in prompt]
    check_mtp(family, len(prompt), max_new_tokens)
    vocab = family.vocab_size
    check_token_ids([prompt], stop_tokens, vocab)
    new, count, rounds, accepted = _run(family, params, jnp.asarray(prompt, jnp.int32),
                                        stop_mask(stop_tokens, vocab),
                                        max_new_tokens=max_new_tokens)
    out = np.asarray(new)[:min(int(count), max_new_tokens)].tolist()
    stops = set(stop_tokens)
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    rounds = int(rounds)
    return out[:cut], SpeculativeStats(rounds=rounds, proposed=rounds * family.cfg.mtp_heads,
                                       accepted=int(accepted))
