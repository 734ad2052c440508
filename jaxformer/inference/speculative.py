"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"): a small draft model proposes ``k`` tokens one at a time, the target
model scores all of them in one call, and a rejection rule keeps a prefix of them so that the
output has exactly the target's distribution (greedy: exactly the target's greedy tokens).

One round, with the sequence ``x[0 .. L-1]`` whose last token ``x[L-1]`` (the *pending* token)
is in neither cache yet (both caches hold ``x[0 .. L-2]``, or more, at the same slots):

1. The draft steps ``x[L-2], x[L-1]`` at slots L-2, L-1 (one call, T=2: re-writing slot L-2
   with the same token changes nothing, and fills it when the previous round accepted every
   draft token, whose last one the draft never stepped), then samples d_1 .. d_k from its
   processed distributions q_1 .. q_k, stepping d_1 .. d_{k-1} (k calls in all, T <= 2).
2. The target steps ``x[L-1], d_1 .. d_k`` at slots L-1 .. L+k-1 in ONE call (T=k+1): its
   processed distributions p_1 .. p_{k+1} for the tokens at L .. L+k.
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the first
   rejection; m tokens accepted. The next token is drawn from norm(max(0, p_{m+1} - q_{m+1}))
   when d_{m+1} was rejected, or from p_{k+1} (the bonus token) when all k were accepted.
   Greedy decoding is the same rule with one-hot distributions: d_i is kept iff it is the
   target's argmax, and the next token is the target's argmax.
4. The new pending token sits at slot L+m. Nothing is rolled back: the slots past it hold
   rejected tokens that the decode mask hides (a query sees only slots <= its own) and that
   the next rounds overwrite.

The first new token comes from the target's prefill logits (the prompt fills both caches).
Logits processing (temperature, top-k, top-p, min-p, and the history-dependent repetition,
n-gram and presence/frequency penalties) is applied to both models' logits with the history
each position really has (prompt, tokens so far, then the draft tokens before it), so every
``SamplingParams`` is exact. The whole loop is one ``jax.lax.while_loop`` in one ``jax.jit``.

Letters: P prompt length, N max new tokens, V vocabulary, W = P + N + k the token buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.generate import GREEDY
from jaxformer.inference.processors import (
    SamplingParams,
    check_token_ids,
    process_logits,
    stop_mask,
)


@dataclasses.dataclass
class SpeculativeStats:
    """What the rounds did. A round is one target ``step`` call (the prefill, which gives the
    first token, is not one); tokens past max_new_tokens or a stop token are counted."""

    rounds: int
    proposed: int  # draft tokens proposed: rounds * k
    accepted: int  # draft tokens the target kept

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0 when no round ran)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """Tokens each target ``step`` call produced on average: the accepted draft tokens plus
        one (the correction or the bonus token) per round; the plain loop makes 1."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclasses.dataclass
class _Carry:
    """The loop's carry (a pytree: every field an array). Batch 1: no batch axis on seq."""

    seq: jnp.ndarray  # [W] int32: the prompt, then the new tokens (and draft tokens past them)
    length: jnp.ndarray  # () int32, tokens of seq that are decided (the last one is pending)
    tstate: dict  # the target's cache
    dstate: dict  # the draft's cache
    done: jnp.ndarray  # () bool: N tokens decided or a stop token among them
    rounds: jnp.ndarray  # () int32
    accepted: jnp.ndarray  # () int32


jax.tree_util.register_dataclass(
    _Carry, data_fields=[f.name for f in dataclasses.fields(_Carry)], meta_fields=[])


def _distribution(logits: jnp.ndarray, history: jnp.ndarray, valid: jnp.ndarray,
                  sampling: SamplingParams) -> jnp.ndarray:
    """logits [B, V], history and valid [B, W] -> the processed distributions [B, V] float32
    that ``sample_token`` draws from (one-hot on the argmax when greedy)."""
    logits = process_logits(logits, history, valid, sampling)
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def _draw(key: jax.Array, probs: jnp.ndarray, sampling: SamplingParams) -> jnp.ndarray:
    """A token from probs [V] (the argmax when greedy) -> () int32."""
    if sampling.greedy:
        return jnp.argmax(probs).astype(jnp.int32)
    return jax.random.categorical(key, jnp.log(probs)).astype(jnp.int32)


def speculative_loop(target: DecoderFamily, target_params: Any, draft: DecoderFamily,
                     draft_params: Any, prompt: jnp.ndarray, key: jax.Array,
                     is_stop: jnp.ndarray, *, max_new_tokens: int, k: int,
                     sampling: SamplingParams) -> tuple[jnp.ndarray, ...]:
    """The traceable loop (jit it, or vmap it over keys to draw many samples at once).

    prompt [P] int32, key a PRNG key, is_stop [V] bool (``stop_mask``) -> (new [N + k] int32:
    the decided tokens first, then leftovers; count () int32, how many are decided (may
    exceed N, and run past a stop token: cut them on the host); rounds; accepted). Inputs
    are not checked here: ``speculative_generate`` does it.
    """
    P, N = prompt.shape[0], max_new_tokens
    W = P + N + k
    cache_len = P + N + k - 1  # the last round starts at L <= P + N - 1, writes to L + k - 1
    cols = jnp.arange(W)
    tokens, lengths = prompt[None].astype(jnp.int32), jnp.full((1,), P, jnp.int32)
    first_key, loop_key = jax.random.split(key)

    tlogits, tstate, _ = target.prefill(target_params, tokens, lengths, cache_len)
    _, dstate, _ = draft.prefill(draft_params, tokens, lengths, cache_len)
    seq = jnp.zeros((W,), jnp.int32).at[:P].set(tokens[0])
    p0 = _distribution(tlogits, seq[None], (cols < P)[None], sampling)[0]
    first = _draw(first_key, p0, sampling)
    seq = seq.at[P].set(first)
    carry = _Carry(seq=seq, length=jnp.asarray(P + 1, jnp.int32), tstate=tstate, dstate=dstate,
                   done=is_stop[first] | (N <= 1),
                   rounds=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))

    def body(c: _Carry) -> _Carry:
        L = c.length
        k_draft, k_accept, k_next = jax.random.split(jax.random.fold_in(loop_key, c.rounds), 3)

        def propose(i, logits, seq):
            """Draft token i (0-based, at position L + i) from the draft's logits [V]."""
            q = _distribution(logits[None], seq[None], (cols < L + i)[None], sampling)[0]
            tok = _draw(jax.random.fold_in(k_draft, i), q, sampling)
            return tok, q, seq.at[L + i].set(tok)

        def draft_step(inner, i):
            logits, seq, dstate = inner
            tok, q, seq = propose(i, logits, seq)
            logits, dstate = draft.step(draft_params, tok[None, None], dstate, L + i)
            return (logits[0, -1], seq, dstate), (tok, q)

        last_two = jax.lax.dynamic_slice(c.seq, (L - 2,), (2,))[None]
        dlogits, dstate = draft.step(draft_params, last_two, c.dstate, L - 2)
        (dlogits, seq, dstate), (toks, qs) = jax.lax.scan(
            draft_step, (dlogits[0, -1], c.seq, dstate), jnp.arange(k - 1))
        tok, q, seq = propose(k - 1, dlogits, seq)
        drafts = jnp.concatenate([toks, tok[None]])  # [k]
        qs = jnp.concatenate([qs, q[None]])  # [k, V]

        block = jax.lax.dynamic_slice(seq, (L - 1,), (k + 1,))[None]  # pending, d_1 .. d_k
        tlogits, tstate = target.step(target_params, block, c.tstate, L - 1)
        # Position j (token at L + j) sees the prompt, the decided tokens and d_1 .. d_j.
        valid = cols[None, :] < (L + jnp.arange(k + 1))[:, None]  # [k+1, W]
        ps = _distribution(tlogits[0], jnp.broadcast_to(seq, (k + 1, W)), valid, sampling)

        idx = jnp.arange(k)
        p_d, q_d = ps[idx, drafts], qs[idx, drafts]
        # Greedy: keep d iff it is the target's argmax (p is one-hot). Sampling: u < p/q,
        # written without the division (q(d) > 0: d was drawn from q).
        ok = p_d > 0 if sampling.greedy else jax.random.uniform(k_accept, (k,)) * q_d < p_d
        m = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        # The residual of the first rejected position; past d_k, q is 0: the bonus is from p.
        q_m = jnp.concatenate([qs, jnp.zeros_like(qs[:1])])[m]
        residual = jnp.maximum(ps[m] - q_m, 0.0)
        # p == q to the last bit never rejects; guard the 0/0 anyway.
        residual = jnp.where(residual.sum() > 0, residual, ps[m])
        nxt = _draw(k_next, residual / residual.sum(), sampling)
        seq = seq.at[L + m].set(nxt)
        length = L + m + 1
        new = (cols >= L) & (cols < length)
        hit = jnp.any(is_stop[seq] & new)
        return _Carry(seq=seq, length=length, tstate=tstate, dstate=dstate,
                      done=hit | (length - P >= N), rounds=c.rounds + 1,
                      accepted=c.accepted + m)

    c = jax.lax.while_loop(lambda c: ~c.done, body, carry)
    return c.seq[P:], c.length - P, c.rounds, c.accepted


_run = jax.jit(speculative_loop,
               static_argnames=("target", "draft", "max_new_tokens", "k", "sampling"))


def check_speculative(target: Any, draft: Any, prompt_len: int, max_new_tokens: int,
                      k: int) -> None:
    """Raises UserError when the pair cannot decode together or the request does not fit."""
    for name, fam in (("target", target), ("draft", draft)):
        if not isinstance(fam, DecoderFamily):
            raise UserError(f"speculative decoding needs decoder-only models; the {name} is "
                            f"{getattr(fam, 'kind', type(fam).__name__)!r}")
    for fam in (target, draft):  # rejected draft tokens stay in the cache, masked
        fam.require_slot_cache("speculative decoding")
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"the draft's vocabulary ({draft.vocab_size}) differs from the "
                        f"target's ({target.vocab_size}): they must share one tokenizer")
    if k < 1:
        raise UserError(f"k (draft tokens per round) must be at least 1, got {k}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise UserError("the prompt needs at least one token")
    need = prompt_len + max_new_tokens + k - 1
    for name, fam in (("target", target), ("draft", draft)):
        if need > fam.cfg.max_len:
            raise UserError(
                f"the prompt ({prompt_len} tokens) + max new tokens ({max_new_tokens}) + k - 1 "
                f"({k - 1}, the last round's lookahead) = {need} exceeds the {name}'s context "
                f"(model.max_len {fam.cfg.max_len})")


def speculative_generate(target: DecoderFamily, target_params: Any, draft: DecoderFamily,
                         draft_params: Any, prompt: Sequence[int], *, max_new_tokens: int,
                         k: int = 4, sampling: SamplingParams = GREEDY,
                         stop_tokens: Sequence[int] = (), seed: int = 0
                         ) -> tuple[list[int], SpeculativeStats]:
    """Generates up to ``max_new_tokens`` tokens after ``prompt`` (one prompt: batch 1) with
    the draft proposing ``k`` tokens per round -> (the new tokens, without the stop token, as
    ``Generator.generate`` returns them; the stats).

    The output has the target's distribution under ``sampling`` exactly (greedy: it is the
    target's greedy output, up to float rounding between a T=k+1 and a T=1 call at near-ties),
    whatever the draft; a better draft only makes it faster. The draft must share the
    target's tokenizer (checked: the same vocabulary size). Both caches hold
    P + max_new_tokens + k - 1 slots, which must fit both models' context.
    """
    sampling.check()
    prompt = [int(t) for t in prompt]
    check_speculative(target, draft, len(prompt), max_new_tokens, k)
    vocab = target.vocab_size
    check_token_ids([prompt], stop_tokens, vocab)
    new, count, rounds, accepted = _run(
        target, target_params, draft, draft_params, jnp.asarray(prompt, jnp.int32),
        jax.random.key(seed), stop_mask(stop_tokens, vocab), max_new_tokens=max_new_tokens,
        k=k, sampling=sampling)
    out = np.asarray(new)[:min(int(count), max_new_tokens)].tolist()
    stops = set(stop_tokens)
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    rounds = int(rounds)
    return out[:cut], SpeculativeStats(rounds=rounds, proposed=rounds * k,
                                       accepted=int(accepted))
