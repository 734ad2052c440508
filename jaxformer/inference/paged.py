"""Paged KV cache (Kwon et al. 2023, vLLM): fixed-size blocks from one shared pool, a block
table per sequence, blocks returned to the pool when a sequence finishes; and prefix caching:
full blocks of prompt tokens are keyed by their content and reused across sequences.

The pool holds, for every layer, each cache array of the model (``LayerCache`` k/v or
``MLACache`` latent/k_rope) as [num_blocks, block_size, ...] instead of [batch, length, ...].
A decode call gathers each row's blocks into a contiguous view, runs the model's ordinary
cached ``decode`` with each row at its own slot, and scatters the slots it wrote back into the
blocks: the logits are those of a contiguous cache, bit for bit.

Block 0 is never handed out: table entries of unused rows and unused blocks point at it, so
writes that belong to no sequence land there and nobody reads them.

Letters: B rows, T tokens per row this call, M blocks per row, Z block size, V vocabulary.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.nn.attention import cache_length, slot_axis

TRASH_BLOCK = 0


class BlockAllocator:
    """Host-side bookkeeping of the pool: free blocks, reference counts, and the content keys
    of full prompt blocks that may be shared (prefix caching). A cached block that no sequence
    uses stays cached until its space is needed (least recently used first)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise UserError(f"a paged cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.free = list(range(num_blocks - 1, TRASH_BLOCK, -1))  # pop() gives 1, 2, ...
        self.refs: dict[int, int] = {}
        self.cached: dict[bytes, int] = {}  # content key -> block
        self.key_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no user

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached with no user)."""
        return len(self.free) + len(self.idle)

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.idle:  # evict the least recently used cached block
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        else:
            raise MemoryError("the paged KV cache has no free block")
        self.refs[block] = 1
        return block

    def prefix_keys(self, tokens: Sequence[int]) -> list[bytes]:
        """The content key of every full block of ``tokens``: a hash of all tokens up to the
        block's end (a block's keys and values depend on everything before it)."""
        keys, h = [], hashlib.sha256()
        z = self.block_size
        for i in range(len(tokens) // z):
            h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens[i * z:(i + 1) * z]))
            keys.append(h.copy().digest())
        return keys

    def allocate(self, tokens: Sequence[int], total: int) -> tuple[list[int], int]:
        """Blocks for a sequence of ``total`` slots whose prompt is ``tokens`` -> (block table,
        how many prompt tokens are already in cached blocks). At least one prompt token is
        always left to compute (its logits start generation)."""
        need = -(-total // self.block_size)
        keys = self.prefix_keys(tokens[:-1]) if self.prefix_caching else []
        table: list[int] = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            self.idle.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1
            table.append(block)
        reused = len(table)
        if need - reused > self.available:
            self.release(table)
            raise MemoryError("the paged KV cache has too few free blocks")
        table += [self._take() for _ in range(need - reused)]
        return table, reused * self.block_size

    def register(self, tokens: Sequence[int], table: Sequence[int]) -> None:
        """After a prompt's keys and values are written: its full blocks become reusable."""
        if not self.prefix_caching:
            return
        for key, block in zip(self.prefix_keys(tokens[:-1]), table, strict=False):
            if key not in self.cached and block not in self.key_of:
                self.cached[key], self.key_of[block] = block, key

    def release(self, table: Sequence[int]) -> None:
        """A sequence finished: its blocks go back (cached ones stay cached, unused)."""
        for block in table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)


def init_pool(model: nnx.Module, num_blocks: int, block_size: int) -> list[dict[str, Any]]:
    """Zeroed pool arrays shaped like the model's own cache, a block per row: [num_blocks,
    block_size, ...] with the block's slots on the array's slot axis (``slot_axis``: k and v
    [num_blocks, K, block_size, H])."""
    return model.init_cache(num_blocks, block_size)


def paged_decode(model: nnx.Module, pool: list[dict[str, Any]], tokens: jnp.ndarray,
                 starts: jnp.ndarray, tables: jnp.ndarray) -> tuple[jnp.ndarray, list]:
    """tokens [B, T] written at slots starts[b] .. starts[b] + T - 1 of row b, whose blocks are
    tables [B, M] -> (logits [B, T, V], the pool with those slots written)."""
    b, t = tokens.shape
    z = cache_length(pool[0])
    views = [{k: _gather_blocks(a, tables, slot_axis(k)) for k, a in layer.items()}
             for layer in pool]  # each row's blocks as one cache of M*Z slots
    logits, views = model.decode(tokens, views, starts)
    slots = starts[:, None] + jnp.arange(t)  # [B, T]
    blocks = jnp.take_along_axis(tables, slots // z, axis=1).reshape(-1)
    offsets = (slots % z).reshape(-1)
    rows = jnp.repeat(jnp.arange(b), t)
    new_pool = [{k: _scatter_slots(a, view[k], slot_axis(k), blocks, offsets, rows,
                                   slots.reshape(-1))
                 for k, a in layer.items()} for layer, view in zip(pool, views, strict=True)]
    return logits, new_pool


def _gather_blocks(pool: jnp.ndarray, tables: jnp.ndarray, axis: int) -> jnp.ndarray:
    """pool [NB, ..., Z (at ``axis``), ...] and tables [B, M] -> [B, ..., M*Z, ...]."""
    blocks = jnp.moveaxis(pool[tables], 1, axis)  # [B, ..., M, Z, ...]
    shape = blocks.shape
    return blocks.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def _scatter_slots(pool: jnp.ndarray, view: jnp.ndarray, axis: int, blocks: jnp.ndarray,
                   offsets: jnp.ndarray, rows: jnp.ndarray, slots: jnp.ndarray) -> jnp.ndarray:
    """The pool with slot ``slots[i]`` of view row ``rows[i]`` written at slot ``offsets[i]`` of
    block ``blocks[i]`` (slots on ``axis`` in both)."""
    between = (slice(None),) * (axis - 1)  # the axes before the slots (k/v: the heads)
    # Advanced indices around slices: the indexed dimension comes first on both sides, [N, ...].
    return pool.at[(blocks, *between, offsets)].set(view[(rows, *between, slots)])

