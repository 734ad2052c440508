"""XLNet's two-stream self-attention (Yang et al. 2019, "XLNet: Generalized Autoregressive
Pretraining for Language Understanding"), the model of ``objective.kind='permutation_lm'``.

Each row comes with a factorisation order: ``order[b, t]`` is the rank of token t in its
document's sampled permutation (0 = predicted first). Two streams run through the same blocks
(every weight shared):

* the content stream h, started from the token embeddings: token t attends to the content of
  the tokens of its document whose rank is <= its own (itself included);
* the query stream g, started from one learned vector ``query_embed`` (no token content) plus
  the position: token t attends to the content of the tokens of its document whose rank is
  < its own, never its own content, so g_t can predict x_t.

The logits come from the query stream of the last layer. Both streams travel as one
[B, 2T, D] array (content rows first), so a block runs its attention once, with 2T queries
over the T content keys and values, and its norms and feed-forward once over both; the
layer-stack machinery (scan, remat, dropout keys) is the decoder's.

A query row with no visible key (the first token of a document's order) would get the
kernels' uniform softmax over every key, its own content included; its attention update is
set to zero instead, so its query stream depends on its position alone.

Differences from the paper: no Transformer-XL recurrence memory or segment recurrence, and the
position scheme is one of the framework's (rope, learned or sinusoidal absolute positions, or
T5 / Shaw relative biases, bidirectional) instead of Transformer-XL's relative encoding with
its two learned global biases; the query stream needs position information to know which
position it predicts, so ``pos_encoding='none'`` (and ALiBi, which is one-sided) is refused.

Letters: B batch, T length, D model width, N heads, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import (
    InputEmbedding,
    RelativePositionBias,
    TransformerBlock,
    Unembedding,
    dtypes,
    final_norm,
    split_rng,
    token_table,
)
from jaxformer.models.layer_stack import apply_blocks, make_blocks
from jaxformer.nn.dropout import dropout
from jaxformer.nn.params import normal_param

# The position schemes that tell the query stream where it is (bidirectionally).
POSITIONS = ("rope", "learned", "sinusoidal", "t5_relative", "shaw")


def check_xlnet_config(m: ModelConfig) -> None:
    """ValueError (one line) for the model options a two-stream XLNet cannot take."""
    refused = [
        (m.attention_type != "mha", f"model.attention_type='mha' (got {m.attention_type!r}: "
                                    "the query stream needs a dense order mask)"),
        (m.pos_encoding not in POSITIONS,
         f"model.pos_encoding one of {', '.join(POSITIONS)} (got {m.pos_encoding!r}: the query "
         "stream must know which position it predicts)"),
        (m.n_experts > 0, f"dense feed-forwards (model.n_experts=0, got {m.n_experts}: expert "
                          "capacity would couple the streams' tokens)"),
        (m.reversible, "model.reversible=false"),
        (m.sliding_window > 0, f"model.sliding_window=0 (got {m.sliding_window}: a window over "
                               "positions means nothing under a permuted order)"),
        (m.type_vocab_size > 0, f"model.type_vocab_size=0 (got {m.type_vocab_size})"),
    ]
    for bad, needs in refused:
        if bad:
            raise ValueError(f"model.arch='xlnet' needs {needs}")


def two_stream_masks(order: jnp.ndarray, segment_ids: jnp.ndarray
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The masks of the two streams, True where query t may attend to the content of key s.

    order: [B, T] int, each token's rank in its document's factorisation order; segment_ids:
    [B, T] int (0 = padding). content(t, s) = same segment and order[s] <= order[t];
    query(t, s) = same segment and order[s] < order[t]. -> (content, query), [B, 1, T, T] bool.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    rank_q, rank_k = order[:, :, None], order[:, None, :]
    return (same & (rank_k <= rank_q))[:, None], (same & (rank_k < rank_q))[:, None]


@dataclasses.dataclass
class TwoStreamInputs:
    """What every block's attention needs, computed once per forward pass."""

    mask: jnp.ndarray  # [B, 1, 2T, T] bool: content rows, then query rows
    has_key: jnp.ndarray  # [B, 2T, 1] bool: the row sees at least one key
    q_positions: jnp.ndarray  # [B, 2T]
    k_positions: jnp.ndarray  # [B, T]
    bias: jnp.ndarray | None  # [B, N, 2T, T] float32 (relative biases) or None


def _residual(cfg: ModelConfig, x: jnp.ndarray, norm: nnx.Module,
              branch: Callable[[jnp.ndarray], jnp.ndarray], rng: jax.Array | None
              ) -> jnp.ndarray:
    """A residual branch with its norm before (pre-LN) or after (post-LN), as in
    ``TransformerBlock``."""
    if cfg.norm_position == "pre":
        return x + dropout(branch(norm(x)), cfg.dropout, rng)
    return norm(x + dropout(branch(x), cfg.dropout, rng))


def two_stream_block(cfg: ModelConfig, block: TransformerBlock, x: jnp.ndarray,
                     inputs: TwoStreamInputs, rng: jax.Array | None) -> jnp.ndarray:
    """One block over both streams: x [B, 2T, D] (content rows, then query rows) -> [B, 2T, D].

    The attention's queries are all 2T rows; its keys and values the T content rows (after the
    norm in a pre-LN block, as the content stream's own attention sees them), so the query
    stream reads content and nothing reads the query stream. The same dropout keys as a
    ``TransformerBlock`` call (5 per block)."""
    rngs = split_rng(rng, 5)
    t = inputs.k_positions.shape[1]

    def attend(z: jnp.ndarray) -> jnp.ndarray:
        y, _ = block.attn(z, context=z[:, :t], q_positions=inputs.q_positions,
                          k_positions=inputs.k_positions, mask=inputs.mask, bias=inputs.bias,
                          dropout_rng=rngs[0])
        return y * inputs.has_key.astype(y.dtype)  # an empty row learns nothing, leaks nothing

    x = _residual(cfg, x, block.attn_norm, attend, rngs[1])
    return _residual(cfg, x, block.mlp_norm, lambda z: block.mlp(z, chunks=cfg.ff_chunks),
                     rngs[4])


class XLNetLM(nnx.Module):
    """Token ids and a factorisation order -> logits of each token from its query stream.

    Params: the decoder's (``embed``, ``inputs``, ``rel_bias``, ``blocks/{i}``, ``final_norm``,
    ``unembed``), created in the decoder's order, and ``query_embed`` [D] (embed): the query
    stream's start, XLNet's learned ``w``. With the same seed every other weight is the
    ``DecoderLM``'s (for rope or absolute positions), which the tests use.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        check_xlnet_config(cfg)
        _, pdtype = dtypes(cfg)
        self.cfg = cfg
        self.embed = token_table(cfg, rngs)
        self.inputs = InputEmbedding(cfg, rngs=rngs)
        # Bidirectional: under a permuted order a token reads keys on both sides.
        self.rel_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.n_layers,
                                  lambda i, r: TransformerBlock(cfg, rngs=r), rngs)
        self.final_norm = final_norm(cfg)
        self.unembed = Unembedding(cfg, rngs=rngs)
        self.query_embed = normal_param(rngs, (cfg.d_model,), ("embed",), cfg.init_std, pdtype)

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, *, order: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None, return_content: bool = False
                 ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """tokens, positions, segment_ids, order: [B, T] int (segment_ids None: one document
        per row; order None: the identity order, left to right) -> query-stream logits
        [B, T, V] float32 (row t predicts tokens[t]); with ``return_content`` also the
        content stream's logits [B, T, V] (through the same final norm and un-embedding: under
        the identity order, a causal decoder's logits)."""
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if order is None:
            order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rngs = split_rng(dropout_rng, cfg.n_layers + 2)
        content, query = two_stream_masks(order, segment_ids)
        mask = jnp.concatenate([content, query], axis=2)  # [B, 1, 2T, T]
        q_positions = jnp.concatenate([positions, positions], axis=1)
        inputs = TwoStreamInputs(mask=mask, has_key=mask[:, 0].any(-1)[..., None],
                                 q_positions=q_positions, k_positions=positions,
                                 bias=self.rel_bias(q_positions, positions))
        h = self.inputs(self.embed, tokens, positions, dropout_rng=rngs[-1])
        w = self.query_embed[...].astype(h.dtype)
        if cfg.embed_scale:  # the same scale as the token vectors it stands in for
            w = w * jnp.asarray(math.sqrt(cfg.d_model), h.dtype)
        g = self.inputs.add(jnp.broadcast_to(w, h.shape), positions, dropout_rng=rngs[-2])
        x = jnp.concatenate([h, g.astype(h.dtype)], axis=1)
        x = apply_blocks(self, self.blocks, cfg, x, rngs[:cfg.n_layers],
                         lambda block, z, rng: two_stream_block(cfg, block, z, inputs, rng))
        logits = self._logits(x[:, t:])
        return (logits, self._logits(x[:, :t])) if return_content else logits

    def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.unembed(x, self.embed)
