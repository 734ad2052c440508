"""Encoder-only Transformer (BERT): bidirectional self-attention over packed segments, with a
masked-LM head, a pooled sequence-classification head or a per-token classification head.

Letters: B batch, T length, D model width, V vocabulary, L labels (cfg.num_labels, or
cfg.token_labels for the per-token head).

Heads follow Hugging Face's BERT classes, chosen by ``cfg.num_labels`` and ``cfg.token_labels``:

    num_labels == 0   masked LM (``BertForMaskedLM``): dense D->D -> activation -> LayerNorm
                      -> un-embedding (tied with the token table unless cfg.tie_embeddings is
                      False) + an output bias [V]. ``__call__`` -> [B, T, V].
    num_labels > 0    sequence classifier (``BertForSequenceClassification``): pooler (dense
                      D->D + tanh on the first token's final hidden state, or with
                      ``cfg.pooling='mean'`` on the mean over the real tokens; none with
                      ``cfg.pooler=False``, as ViTForImageClassification) -> dropout ->
                      dense D->L. ``classify`` -> [B, L]. This model has no masked-LM head, as in
                      transformers, so its ``__call__`` raises.
    + two_tower       pair classifier (LRA's retrieval, Tay et al. 2021): each row holds two
                      sequences of T tokens, encoded separately by the same encoder; their
                      pooled states u, v (as above) give [u, v, u*v, u-v] -> dropout ->
                      dense 4D->F -> ReLU -> dense F->L (F = d_ff; LRA's dual head, which
                      stacks a second hidden layer). ``classify_pair`` -> [B, L].
    token_labels > 0  token classifier (``BertForTokenClassification``): dropout -> dense D->L
                      on every token's final hidden state, no pooler. ``__call__`` (and
                      ``tag``) -> [B, T, L]: like the masked-LM head, one prediction per token.

``encode`` gives the final hidden states [B, T, D] of either.

With ``cfg.patch_size > 0`` the encoder is a Vision Transformer (Dosovitskiy et al. 2021): it
reads images instead of tokens (``models.vision.PatchEmbedding`` replaces the token table;
the same positions, blocks, pooler and classifier follow). ``encode_image`` gives its final
hidden states [B, T, D] and ``classify_image`` its class logits [B, L].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import (
    AttentionInputs,
    InputEmbedding,
    RelativePositionBias,
    TransformerBlock,
    Unembedding,
    dtypes,
    final_norm,
    is_moe_layer,
    split_rng,
    token_table,
)
from jaxformer.models.layer_stack import apply_blocks, make_blocks
from jaxformer.models.vision import PatchEmbedding
from jaxformer.nn.dropout import dropout
from jaxformer.nn.embedding import Embedding
from jaxformer.nn.feedforward import ACTIVATIONS, GATED_ACTIVATIONS, activation_fn
from jaxformer.nn.norms import make_norm
from jaxformer.nn.params import LogicalAxes, constant_param, normal_param


class Dense(nnx.Module):
    """y = x @ w + b. Params: ``w`` [in, out] (``axes``), ``b`` [out] (``axes[-1]``), b at 0."""

    def __init__(self, d_in: int, d_out: int, axes: LogicalAxes, *, init_std: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w = normal_param(rngs, (d_in, d_out), axes, init_std, param_dtype)
        self.b = constant_param((d_out,), axes[-1:], 0.0, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., in] -> [..., out] in the compute dtype."""
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = x2 @ self.w[...].astype(self.dtype) + self.b[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class MaskedLMHead(nnx.Module):
    """BERT's prediction head: hidden states -> vocabulary logits.

    Params: ``transform`` (Dense D->D, (embed, None)), ``norm`` (LayerNorm, eps cfg.norm_eps),
    ``unembed`` (``lm_head`` [D, V] when untied), ``bias`` [V] (vocab).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        if cfg.activation not in ACTIVATIONS or cfg.activation in GATED_ACTIVATIONS:
            raise ValueError(f"the masked-LM head needs a plain activation (relu, gelu, "
                             f"gelu_tanh), got {cfg.activation!r}")
        self.activation = cfg.activation
        self.transform = Dense(cfg.d_model, cfg.d_model, ("embed", None), init_std=cfg.init_std,
                               dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                              param_dtype=pdtype)
        self.unembed = Unembedding(cfg, rngs=rngs)
        self.bias = constant_param((cfg.vocab_size,), ("vocab",), 0.0, pdtype)

    def __call__(self, x: jnp.ndarray, embed: Embedding) -> jnp.ndarray:
        """x: [B, T, D], embed: the token table -> logits [B, T, V] float32."""
        h = self.norm(activation_fn(self.activation)(self.transform(x)))
        return self.unembed(h, embed) + self.bias[...].astype(jnp.float32)


class EncoderModel(nnx.Module):
    """Token ids -> masked-LM logits (or, with cfg.num_labels > 0, class logits); with
    cfg.patch_size > 0, images -> class logits.

    Params: ``embed`` (token table; ``patches`` instead for images: ``PatchEmbedding``),
    ``inputs`` (positions, token types, embedding norm),
    ``rel_bias`` (ALiBi / T5 / Shaw, bidirectional; shared by all layers), ``blocks/{i}``,
    ``final_norm`` (when cfg.final_norm), then either ``mlm`` (num_labels == 0) or ``pooler``
    (Dense D->D; None with ``cfg.pooler=False``) and ``classifier`` (Dense D->L; with
    cfg.two_tower ``pair_hidden`` Dense 4D->F, then ``classifier`` Dense F->L)
    (num_labels > 0), or ``token_classifier`` (Dense D->L; token_labels > 0).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = dtypes(cfg)
        if cfg.patch_size > 0:
            self.embed, self.patches = None, PatchEmbedding(cfg, rngs=rngs)
        else:
            self.embed, self.patches = token_table(cfg, rngs), None
        self.inputs = InputEmbedding(cfg, rngs=rngs)
        self.rel_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.n_layers, lambda i, r: TransformerBlock(
            cfg, moe=is_moe_layer(cfg, i), rngs=r), rngs)
        self.final_norm = final_norm(cfg)
        if cfg.token_labels > 0:  # per-token labels: neither a pooler nor a masked-LM head
            self.mlm = self.pooler = self.classifier = None
            self.token_classifier = Dense(cfg.d_model, cfg.token_labels, ("embed", None),
                                          init_std=cfg.init_std, dtype=dtype,
                                          param_dtype=pdtype, rngs=rngs)
        elif cfg.num_labels > 0:
            self.mlm = None
            self.pooler = (Dense(cfg.d_model, cfg.d_model, ("embed", None),
                                 init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype,
                                 rngs=rngs) if cfg.pooler else None)
            # A pair is classified by an MLP over [u, v, u*v, u-v], as LRA's dual head: a
            # linear layer cannot compute |u - v| and, on lra:retrieval, stayed at chance for
            # 300 steps where this head reached 66% (docs/efficient_attention.md).
            self.pair_hidden = (Dense(4 * cfg.d_model, cfg.d_ff, ("embed", "mlp"),
                                      init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype,
                                      rngs=rngs) if cfg.two_tower else None)
            width, axis = (cfg.d_ff, "mlp") if cfg.two_tower else (cfg.d_model, "embed")
            self.classifier = Dense(width, cfg.num_labels, (axis, None), init_std=cfg.init_std,
                                    dtype=dtype, param_dtype=pdtype, rngs=rngs)
        elif cfg.patch_size > 0:  # an image encoder without a head: an image-prefix model's
            self.mlm = self.pooler = self.classifier = None  # vision tower (encode_image)
        else:
            self.mlm = MaskedLMHead(cfg, rngs=rngs)
            self.pooler = self.classifier = None
        if cfg.token_labels <= 0:
            self.token_classifier = None
        if cfg.token_labels > 0 or cfg.num_labels <= 0:  # the branches without a class head
            self.pair_hidden = None

    def encode(self, tokens: jnp.ndarray, positions: jnp.ndarray,
               segment_ids: jnp.ndarray | None = None, token_types: jnp.ndarray | None = None,
               *, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Final hidden states.

        tokens, positions, segment_ids, token_types: [B, T] int. Tokens attend both ways to
        every token of their segment (segment_ids None: one sequence per row; 0 marks padding,
        whose outputs are meaningless); token_types None means all type 0; dropout_rng: a key
        to train with dropout (None: deterministic) -> [B, T, D] in the compute dtype.
        """
        if self.embed is None:
            raise ValueError("this encoder reads images (model.patch_size="
                             f"{self.cfg.patch_size}); call encode_image()/classify_image()")
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        rngs = split_rng(dropout_rng, self.cfg.n_layers + 1)
        x = self.inputs(self.embed, tokens, positions, token_types, dropout_rng=rngs[-1])
        return self._stack(x, positions, segment_ids, rngs[:-1])

    def encode_image(self, pixels: jnp.ndarray, *,
                     dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """A Vision Transformer's final hidden states: pixels [B, H, W, C] float (values as
        the data gives them, e.g. in [0, 1]) -> [B, T, D] in the compute dtype, T =
        ``cfg.image_tokens`` ([CLS] first with pooling 'first', then the patches row by row).
        Every token attends to every other; positions count the tokens from 0."""
        if self.patches is None:
            raise ValueError("encode_image() needs an image encoder (model.patch_size > 0)")
        rngs = split_rng(dropout_rng, self.cfg.n_layers + 1)
        x = self.patches(pixels)
        b, t = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.inputs.add(x, positions, dropout_rng=rngs[-1])
        return self._stack(x, positions, jnp.ones((b, t), jnp.int32), rngs[:-1])

    def _stack(self, x: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
               rngs: list[jax.Array | None]) -> jnp.ndarray:
        """The blocks and the final norm over input vectors x [B, T, D] -> [B, T, D]."""
        inputs = AttentionInputs(q_positions=positions, is_causal=False,
                                 segment_ids=segment_ids,
                                 bias=self.rel_bias(positions, positions))
        x = apply_blocks(self, self.blocks, self.cfg, x, rngs,
                         lambda block, h, rng: block(h, inputs, dropout_rng=rng)[0], inputs)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, token_types: jnp.ndarray | None = None,
                 *, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Per-token logits: the masked-LM head's [B, T, V] float32, or with
        ``cfg.token_labels`` the token classifier's [B, T, L] (``tag``). Arguments as in
        ``encode``."""
        if self.token_classifier is not None:
            return self.tag(tokens, positions, segment_ids, token_types, dropout_rng=dropout_rng)
        if self.mlm is None:
            raise ValueError("this encoder has a classification head (model.num_labels="
                             f"{self.cfg.num_labels}) and no masked-LM head; call classify()")
        x = self.encode(tokens, positions, segment_ids, token_types, dropout_rng=dropout_rng)
        return self.mlm(x, self.embed)

    def tag(self, tokens: jnp.ndarray, positions: jnp.ndarray,
            segment_ids: jnp.ndarray | None = None, token_types: jnp.ndarray | None = None,
            *, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Token-classification logits of every token (``cfg.token_labels`` > 0): final hidden
        states -> dropout -> dense D->L. Arguments as in ``encode`` -> [B, T, L] float32
        (padding's rows meaningless)."""
        if self.token_classifier is None:
            raise ValueError("tag() needs a token-classification head (model.token_labels > 0)")
        rngs = split_rng(dropout_rng, 2)
        x = self.encode(tokens, positions, segment_ids, token_types, dropout_rng=rngs[0])
        return self.token_classifier(dropout(x, self.cfg.dropout, rngs[1])).astype(jnp.float32)

    def classify(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, token_types: jnp.ndarray | None = None,
                 *, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Sequence-classification logits from the first token of each row (BERT's [CLS]).
        Arguments as in ``encode`` -> [B, L] float32."""
        if self.classifier is None or self.cfg.two_tower:
            raise ValueError("classify() needs model.num_labels > 0 and no two_tower "
                             "(a two-tower model classifies pairs: classify_pair())")
        rngs = split_rng(dropout_rng, 2)
        pooled = self._pool(tokens, positions, segment_ids, token_types, rngs[0])
        pooled = dropout(pooled, self.cfg.dropout, rngs[1])
        return self.classifier(pooled).astype(jnp.float32)

    def classify_image(self, pixels: jnp.ndarray, *,
                       dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """A Vision Transformer's class logits: pixels [B, H, W, C] float -> [B, L] float32,
        from the pooler over [CLS] (``pooling='first'``) or the mean of the patches
        (``'mean'``), then dropout and the classifier, as ``classify``."""
        if self.classifier is None or self.patches is None:
            raise ValueError("classify_image() needs model.patch_size > 0 and "
                             "model.num_labels > 0")
        rngs = split_rng(dropout_rng, 2)
        x = self.encode_image(pixels, dropout_rng=rngs[0])
        pooled = dropout(self._pooled(x, None), self.cfg.dropout, rngs[1])
        return self.classifier(pooled).astype(jnp.float32)

    def classify_pair(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                      segment_ids: jnp.ndarray | None = None, *,
                      dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Two-tower pair-classification logits (``model.two_tower``).

        tokens, positions, segment_ids: [B, 2T] int, each row two sequences of T tokens one
        after the other (positions counting from 0 in each). Both are encoded with the same
        weights as separate rows [2B, T] (neither sees the other) -> [B, L] float32.
        """
        if self.classifier is None or not self.cfg.two_tower:
            raise ValueError("classify_pair() needs model.num_labels > 0 and model.two_tower")
        b, t2 = tokens.shape
        if t2 % 2:
            raise ValueError(f"classify_pair() needs rows of two equal halves, got length {t2}")

        def towers(x: jnp.ndarray | None) -> jnp.ndarray | None:  # [B, 2T] -> [2B, T]
            return None if x is None else x.reshape(2 * b, t2 // 2)

        rngs = split_rng(dropout_rng, 2)
        pooled = self._pool(towers(tokens), towers(positions), towers(segment_ids), None,
                            rngs[0]).reshape(b, 2, -1)
        u, v = pooled[:, 0], pooled[:, 1]  # [B, D] each
        features = dropout(jnp.concatenate([u, v, u * v, u - v], axis=-1), self.cfg.dropout,
                           rngs[1])
        return self.classifier(jax.nn.relu(self.pair_hidden(features))).astype(jnp.float32)

    def _pool(self, tokens, positions, segment_ids, token_types, rng) -> jnp.ndarray:
        """BERT's pooler: tanh(dense(h)) [B, D], h the final hidden state of each row's first
        token (``model.pooling='first'``) or the mean of its real tokens' (``'mean'``: every
        token with segment id > 0; all tokens without segment ids)."""
        x = self.encode(tokens, positions, segment_ids, token_types, dropout_rng=rng)
        return self._pooled(x, segment_ids)

    def _pooled(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
        """tanh(dense(h)) [B, D] of final states x [B, T, D] (h itself with
        ``cfg.pooler=False``): h the first token's, or the mean over the tokens with segment
        id > 0 (all of them when segment_ids is None)."""
        if self.cfg.pooling == "mean":
            real = (jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids > 0)
            w = real.astype(jnp.float32)[..., None]
            h = (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        else:
            h = x[:, 0]
        if self.pooler is None:  # model.pooler=False: ViT's classifier reads h itself
            return h
        return jnp.tanh(self.pooler(h))
