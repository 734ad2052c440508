"""Continuous batching over a paged KV cache: requests join the running batch at any step and
leave it when they finish, their blocks going back to the pool (``inference.paged``).

Each ``Engine.step`` admits waiting requests while a row and enough blocks are free (their
prompt is prefilled alone, after the blocks of a cached prefix), samples one token for every
running request, retires the finished ones, and runs one batched decode call in which every row
sits at its own cache slot. A request's tokens are those it gets decoded alone with a
contiguous cache (``Generator``); greedy requests are identical (tested), sampled ones draw with
the request's own seed.

Decoder-only models (causal); a row's prompt starts at slot 0 of its own blocks.
Letters: R rows (``max_batch``), M blocks per row, Z block size, L model.max_len, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.paged import TRASH_BLOCK, BlockAllocator, init_pool, paged_decode
from jaxformer.inference.processors import SamplingParams, sample_token

GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass
class Request:
    """One generation request and its progress."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)  # new tokens, no stop token
    finish_reason: str | None = None  # "stop" | "length" once finished
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    row: int | None = None
    table: list[int] = dataclasses.field(default_factory=list)
    logits: Any = None  # [V] next-token logits, before sampling
    steps: int = 0  # tokens sampled so far (the sampling key's counter)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Schedules requests over ``max_batch`` rows and a pool of ``num_blocks`` blocks of
    ``block_size`` slots (default: enough for every row at full context, plus block 0)."""

    def __init__(self, family: DecoderFamily, params: Any, *, max_batch: int = 8,
                 block_size: int = 16, num_blocks: int | None = None,
                 prefix_caching: bool = True):
        if family.kind != "decoder" or family.prefix_lm:
            raise UserError("continuous batching serves causal decoder-only models")
        family.require_slot_cache("the paged KV cache (serve, continuous batching)")
        if max_batch < 1 or block_size < 1:
            raise UserError("max_batch and block_size must be at least 1")
        self.family, self.params = family, params
        self.max_len = family.cfg.max_len
        self.block_size = block_size
        self.blocks_per_row = -(-self.max_len // block_size)
        num_blocks = num_blocks or max_batch * self.blocks_per_row + 1
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching)
        self.max_batch = max_batch
        model = nnx.merge(family.graphdef, family.unpack(params))
        # On a device from the start: a pool the decode call returns is committed to one, and
        # an uncommitted first pool would compile every call shape twice.
        self.pool = jax.device_put(init_pool(model, num_blocks, block_size), jax.devices()[0])
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()

        def decode(params, pool, tokens, starts, tables):
            m = nnx.merge(family.graphdef, family.unpack(params))
            logits, pool = paged_decode(m, pool, tokens, starts, tables)
            return logits, pool

        self._decode = jax.jit(decode, donate_argnums=(1,))

    # -- requests ---------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], max_new_tokens: int,
               sampling: SamplingParams = GREEDY, stop_tokens: Sequence[int] = (),
               seed: int = 0) -> Request:
        """Queues a request (checked here: one UserError for what cannot be served)."""
        sampling.check()
        vocab = self.family.vocab_size
        if not prompt:
            raise UserError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise UserError(f"the prompt ({len(prompt)} tokens) + max new tokens "
                            f"({max_new_tokens}) = {len(prompt) + max_new_tokens} exceeds the "
                            f"model's context ({self.max_len})")
        if any(not 0 <= t < vocab for t in [*prompt, *stop_tokens]):
            raise UserError(f"a token id is outside the vocabulary [0, {vocab})")
        need = -(-(len(prompt) + max_new_tokens) // self.block_size)
        if need > self.allocator.num_blocks - 1:
            raise UserError(f"the request needs {need} cache blocks; the pool has "
                            f"{self.allocator.num_blocks - 1}")
        req = Request(next(self._ids), [int(t) for t in prompt], max_new_tokens, sampling,
                      tuple(int(t) for t in stop_tokens), seed)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Ends ``req`` now with finish_reason "stop" (a server matched a stop string, or its
        client left): a waiting request leaves the queue, a running one frees its row and
        blocks. A finished request is left as it is. Call it between steps, from the thread
        that steps."""
        if req.done:
            return
        if req.row is None:  # not admitted yet
            self.waiting = collections.deque(r for r in self.waiting if r is not req)
            req.finish_reason = "stop"
        else:
            self._finish(req, "stop")

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.rows)

    def step(self) -> list[Request]:
        """Admits, samples one token per running request, retires, decodes. -> the requests
        that got a token or finished in this step."""
        self._admit()
        touched = self._sample()
        self._decode_running()
        return touched

    def run(self) -> None:
        """Steps until every submitted request has finished."""
        while not self.idle:
            self.step()

    # -- scheduling --------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and None in self.rows:
            req = self.waiting[0]
            try:
                table, cached = self.allocator.allocate(
                    req.prompt, len(req.prompt) + req.max_new_tokens)
            except MemoryError:
                return  # wait for a running request to free its blocks
            self.waiting.popleft()
            req.row, req.table, req.cached_tokens = self.rows.index(None), table, cached
            self.rows[req.row] = req
            self._prefill(req)
            self.allocator.register(req.prompt, table)

    def _table(self, req: Request | None) -> list[int]:
        table = [] if req is None else req.table
        return table + [TRASH_BLOCK] * (self.blocks_per_row - len(table))

    def _prefill(self, req: Request) -> None:
        """The prompt after its cached prefix, in one call (its length rounded up to a block,
        within the row's slots, so that few lengths compile)."""
        rest = req.prompt[req.cached_tokens:]
        room = self.blocks_per_row * self.block_size - req.cached_tokens
        width = min(-(-len(rest) // self.block_size) * self.block_size, room)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(rest)] = rest
        logits, self.pool = self._decode(
            self.params, self.pool, jnp.asarray(tokens),
            jnp.asarray([req.cached_tokens], jnp.int32), jnp.asarray([self._table(req)]))
        req.logits = logits[0, len(rest) - 1]

    def _sample(self) -> list[Request]:
        running = [r for r in self.rows if r is not None and r.logits is not None]
        groups: dict[SamplingParams, list[Request]] = collections.defaultdict(list)
        for req in running:
            groups[req.sampling].append(req)
        for sampling, reqs in groups.items():
            for req, tok in zip(reqs, self._draw(sampling, reqs), strict=True):
                req.steps += 1
                req.logits = None
                if tok in req.stop_tokens:
                    self._finish(req, "stop")
                    continue
                req.tokens.append(tok)
                if len(req.tokens) >= req.max_new_tokens:
                    self._finish(req, "length")
        return running

    def _draw(self, sampling: SamplingParams, reqs: list[Request]) -> list[int]:
        """One token per request, each with its own key (seed, step) as ``Generator`` uses."""
        n = self.max_batch  # a fixed shape: one compile per sampling setting
        logits = jnp.stack([r.logits for r in reqs]
                           + [jnp.zeros_like(reqs[0].logits)] * (n - len(reqs)))
        history = np.zeros((n, self.max_len), np.int32)
        valid = np.zeros((n, self.max_len), bool)
        keys = np.zeros(n, np.uint32)
        steps = np.zeros(n, np.int32)
        for i, r in enumerate(reqs):
            seq = r.prompt + r.tokens
            history[i, :len(seq)], valid[i, :len(seq)] = seq, True
            keys[i], steps[i] = r.seed, r.steps
        out = _draw_rows(sampling, logits, jnp.asarray(history), jnp.asarray(valid),
                         jnp.asarray(keys), jnp.asarray(steps))
        return [int(t) for t in np.asarray(out)[:len(reqs)]]

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.allocator.release(req.table)
        self.rows[req.row] = None
        req.row, req.table = None, []

    def _decode_running(self) -> None:
        live = [r for r in self.rows if r is not None]
        if not live:
            return
        tokens = np.zeros((self.max_batch, 1), np.int32)
        starts = np.zeros(self.max_batch, np.int32)
        for r in live:
            tokens[r.row, 0] = r.tokens[-1]
            starts[r.row] = len(r.prompt) + len(r.tokens) - 1
        tables = jnp.asarray([self._table(r) for r in self.rows])
        logits, self.pool = self._decode(self.params, self.pool, jnp.asarray(tokens),
                                         jnp.asarray(starts), tables)
        for r in live:
            r.logits = logits[r.row, 0]


@functools.partial(jax.jit, static_argnums=(0,))
def _draw_rows(sampling: SamplingParams, logits: jnp.ndarray, history: jnp.ndarray,
               valid: jnp.ndarray, seeds: jnp.ndarray, steps: jnp.ndarray) -> jnp.ndarray:
    """logits [R, V] -> [R] tokens; row r drawn with key fold_in(key(seeds[r]), steps[r])."""
    def one(lg, h, v, seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return sample_token(lg[None], key, sampling, h[None], v[None])[0]

    return jax.vmap(one)(logits, history, valid, seeds, steps)
