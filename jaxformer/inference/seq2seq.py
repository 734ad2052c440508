"""Greedy decoding for encoder-decoder models: encode once, then one target token per step
through the decoder's self-attention cache.

Letters: B batch, S source length, T target length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import Config
from jaxformer.data.synthetic import EOS_ID, PAD_ID
from jaxformer.objectives.base import Task


class GreedyDecoder:
    """Jitted encode and decode-step functions for one model graph."""

    def __init__(self, graphdef: nnx.GraphDef):
        def encode(params, enc_tokens, enc_segment_ids, enc_positions):
            return nnx.merge(graphdef, params).encode(enc_tokens, enc_segment_ids, enc_positions)

        def step(params, token, memory, enc_segment_ids, cache, index):
            model = nnx.merge(graphdef, params)
            logits, cache = model.decode(token, memory, enc_segment_ids, cache, index)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        def init_cache(params, batch, length):
            return nnx.merge(graphdef, params).init_cache(batch, length)

        self._encode = jax.jit(encode)
        self._step = jax.jit(step)
        self._init_cache = jax.jit(init_cache, static_argnums=(1, 2))

    def __call__(self, params: Any, enc_tokens: np.ndarray, enc_segment_ids: np.ndarray,
                 enc_positions: np.ndarray, max_len: int, start_id: int,
                 eos_id: int) -> np.ndarray:
        """[B, S] source arrays -> [B, max_len] greedy target ids; after a row's EOS the rest
        of the row is EOS."""
        memory = self._encode(params, enc_tokens, enc_segment_ids, enc_positions)
        b = enc_tokens.shape[0]
        cache = self._init_cache(params, b, max_len)
        token = jnp.full((b, 1), start_id, jnp.int32)
        out = []
        for i in range(max_len):
            nxt, cache = self._step(params, token, memory, enc_segment_ids, cache,
                                    jnp.asarray(i, jnp.int32))
            out.append(nxt)
            token = nxt[:, None]
        ids = np.asarray(jnp.stack(out, axis=1))
        done = np.cumsum(ids == eos_id, axis=1) > 0
        after_eos = np.concatenate([np.zeros((b, 1), bool), done[:, :-1]], axis=1)
        return np.where(after_eos, eos_id, ids)


def exact_match(cfg: Config, graphdef: Any, params: Any, task: Task) -> float:
    """Share of held-out sources whose greedy translation equals the reference exactly
    (``eval.batches`` batches, 16 when that is 0)."""
    data = task.translation
    assert data is not None, "exact match decodes a synthetic translation task"
    decoder = GreedyDecoder(graphdef)
    hits = total = 0
    for batch in data.val_batches(cfg.train.batch_size, cfg.eval.batches or 16):
        out = decoder(params, batch["enc_inputs"], batch["enc_segment_ids"],
                      batch["enc_positions"], data.seq_len, PAD_ID, EOS_ID)
        want = np.where(batch["loss_weights"] > 0, batch["targets"], EOS_ID)
        hits += int((out == want).all(axis=1).sum())
        total += len(out)
    return hits / max(total, 1)
