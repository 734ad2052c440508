"""``from_pretrained`` / ``save_pretrained``: Hugging Face directories <-> jaxformer models.

Letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jaxformer.config import ModelConfig
from jaxformer.hf import bert, gpt2, llama, mistral, t5, tokens, vit
from jaxformer.hf.checkpoint_io import (
    HFConversionError,
    read_hf_config,
    read_hf_dir,
    write_hf_dir,
)
from jaxformer.hf.mapping import export_tensors, flatten, import_tensors, unflatten_like
from jaxformer.models.build import abstract_model

# model_type in config.json -> the module describing that family's layout.
FAMILIES: dict[str, types.ModuleType] = {gpt2.MODEL_TYPE: gpt2}
FAMILIES[bert.MODEL_TYPE] = bert
FAMILIES[llama.MODEL_TYPE] = llama
FAMILIES[mistral.MODEL_TYPE] = mistral
FAMILIES[t5.MODEL_TYPE] = t5
FAMILIES[vit.MODEL_TYPE] = vit  # import only


def family_of(model_type: str) -> types.ModuleType:
    if model_type not in FAMILIES:
        raise HFConversionError(f"unsupported architecture {model_type!r}; supported: "
                                f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def infer_model_type(cfg: ModelConfig) -> str:
    """The first family whose layout ``cfg`` fits (check_exportable passes); a one-line error
    with each family's objection otherwise."""
    reasons = []
    for name, family in FAMILIES.items():
        try:
            family.check_exportable(cfg)
            return name
        except HFConversionError as e:
            reasons.append(f"{name}: {e}")
    raise HFConversionError("no Hugging Face family fits this model (" + "; ".join(reasons) + ")")


def param_shapes(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """-> (the pure parameter dict of ShapeDtypeStructs, {"a/b": shape})."""
    _, abstract = abstract_model(cfg)
    template = nnx.to_pure_dict(abstract)
    return template, {k: tuple(v.shape) for k, v in flatten(template).items()}


def _real_positions(mask: jax.Array) -> jax.Array:
    """[B, T] 1/0 -> positions counting real tokens, so right padding changes nothing."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def _mask_or_ones(ids: jax.Array, mask: Any) -> jax.Array:
    return jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)


@dataclasses.dataclass
class PretrainedModel:
    """A jaxformer model with its parameters, called like a transformers model.

    Decoder-only and encoder-only: ``model(input_ids, attention_mask=None)`` (encoders also
    take ``token_type_ids=``); encoder-decoder: ``model(input_ids, decoder_input_ids,
    attention_mask=None, decoder_attention_mask=None)``. Inputs are [B, T] numpy or jax arrays;
    attention masks are 1 for real tokens and 0 for padding. -> logits [B, T, V] float32 (the
    decoder's length for encoder-decoders); a token classifier (``token_labels`` > 0, as
    ``*ForTokenClassification``) gives its per-token logits [B, T, token_labels].
    """

    config: ModelConfig
    params: dict[str, Any]  # the pure parameter dict the trainer uses
    model_type: str

    def __post_init__(self) -> None:
        graphdef, _ = abstract_model(self.config)

        def forward(params, *args):
            return nnx.merge(graphdef, params)(*args)

        self._forward = jax.jit(forward)

    def __call__(self, input_ids: Any, *args: Any, **kwargs: Any) -> jax.Array:
        ids = jnp.asarray(input_ids, jnp.int32)
        if self.config.arch == "encoder_decoder":
            return self._seq2seq(ids, *args, **kwargs)
        if self.config.arch == "encoder":
            return self._encoder(ids, *args, **kwargs)
        return self._decoder(ids, *args, **kwargs)

    def _decoder(self, ids: jax.Array, attention_mask: Any = None) -> jax.Array:
        mask = _mask_or_ones(ids, attention_mask)
        return self._forward(self.params, ids, _real_positions(mask), mask)

    def _encoder(self, ids: jax.Array, attention_mask: Any = None,
                 token_type_ids: Any = None) -> jax.Array:
        mask = _mask_or_ones(ids, attention_mask)
        types = None if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        return self._forward(self.params, ids, _real_positions(mask), mask, types)

    def classify(self, input_ids: Any, attention_mask: Any = None,
                 token_type_ids: Any = None) -> jax.Array:
        """Sequence-classification logits of an encoder with num_labels > 0 (as transformers'
        ``*ForSequenceClassification``): [B, T] inputs -> [B, num_labels] float32."""
        if self.config.arch != "encoder" or self.config.num_labels <= 0:
            raise HFConversionError("classify() needs an encoder with num_labels > 0")
        if getattr(self, "_classify", None) is None:
            graphdef, _ = abstract_model(self.config)
            self._classify = jax.jit(lambda params, *args: nnx.merge(graphdef, params)
                                     .classify(*args))
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = _mask_or_ones(ids, attention_mask)
        types = None if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        return self._classify(self.params, ids, _real_positions(mask), mask, types)

    def classify_image(self, pixels: Any) -> jax.Array:
        """Class logits of an image encoder (as transformers' ``ViTForImageClassification``):
        pixels [B, H, W, C] float, channels LAST (transformers' ``pixel_values`` [B, C, H, W]
        transposed by (0, 2, 3, 1)), normalized as the model's image processor does ->
        [B, num_labels] float32."""
        if self.config.patch_size <= 0:
            raise HFConversionError("classify_image() needs an image encoder (a ViT)")
        if getattr(self, "_classify_image", None) is None:
            graphdef, _ = abstract_model(self.config)
            self._classify_image = jax.jit(lambda params, x: nnx.merge(graphdef, params)
                                           .classify_image(x))
        return self._classify_image(self.params, jnp.asarray(pixels, jnp.float32))

    def _seq2seq(self, ids: jax.Array, decoder_input_ids: Any, attention_mask: Any = None,
                 decoder_attention_mask: Any = None) -> jax.Array:
        dec = jnp.asarray(decoder_input_ids, jnp.int32)
        mask = _mask_or_ones(ids, attention_mask)
        dec_mask = _mask_or_ones(dec, decoder_attention_mask)
        return self._forward(self.params, ids, dec, mask, dec_mask, _real_positions(mask),
                             _real_positions(dec_mask))


def from_pretrained(directory: Path | str) -> PretrainedModel:
    """Reads a transformers ``save_pretrained`` directory (config.json + safetensors)."""
    hf_cfg, tensors = read_hf_dir(directory)
    model_type = hf_cfg.get("model_type", "")
    family = family_of(model_type)
    cfg = _model_config(family, hf_cfg, tensors, directory)
    return PretrainedModel(cfg, params_from_tensors(family, cfg, tensors), model_type)


def pretrained_config(directory: Path | str) -> ModelConfig:
    """The model config ``from_pretrained`` would give, reading the tensors only for a family
    whose layout they settle (T5's head)."""
    hf_cfg = read_hf_config(directory)
    family = family_of(hf_cfg.get("model_type", ""))
    tensors = read_hf_dir(directory)[1] if hasattr(family, "config_for_tensors") else {}
    return _model_config(family, hf_cfg, tensors, directory)


def _model_config(family: types.ModuleType, hf_cfg: dict, tensors: dict[str, np.ndarray],
                  directory: Path | str) -> ModelConfig:
    try:
        cfg = family.model_config(hf_cfg)
        if hasattr(family, "config_for_tensors"):  # the tensors settle part of the layout
            cfg = family.config_for_tensors(cfg, tensors)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        # A hand-edited or foreign config.json: a missing field, a string where a number goes.
        raise HFConversionError(f"{Path(directory) / 'config.json'} does not describe a "
                                f"{hf_cfg.get('model_type')!r} model: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}") from None
    return cfg


def params_from_tensors(family: types.ModuleType, cfg: ModelConfig,
                        tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    template, shapes = param_shapes(cfg)
    flat = import_tensors(family.rules(cfg), tensors, shapes)
    return jax.tree.map(jnp.asarray, unflatten_like(template, flat))


def save_pretrained(model: PretrainedModel | tuple[ModelConfig, dict[str, Any]],
                    directory: Path | str, model_type: str | None = None,
                    tokenizer: Tokenizer | None = None,
                    special_ids: dict[str, Any] | None = None) -> None:
    """Writes a directory that transformers' Auto* classes load with the same logits.

    ``model`` is a ``PretrainedModel`` or a (model config, pure parameter dict) pair, e.g.
    from a training run. With the run's ``tokenizer``, config.json (and generation_config.json
    of a generating family) carries its end-of-text and padding ids in the family's names, and
    the directory gets the tokenizer for ``AutoTokenizer`` (``jaxformer.hf.tokens``).
    ``special_ids`` (``*_token_id`` entries: a converted model's own, ``tokens.exported_ids``)
    are written instead of those found in ``tokenizer`` by jaxformer's names.
    """
    if isinstance(model, PretrainedModel):
        cfg, params, model_type = model.config, model.params, model.model_type
    else:
        cfg, params = model
    model_type = model_type or infer_model_type(cfg)
    family = family_of(model_type)
    family.check_exportable(cfg)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    hf_config = family.hf_config(cfg)
    if special_ids is not None:
        ids = dict(special_ids)
    else:
        ids = tokens.special_ids(family, tokenizer) if tokenizer is not None else {}
    hf_config.update(ids)
    directory = Path(directory)
    write_hf_dir(directory, hf_config, export_tensors(family.rules(cfg), flat))
    if family.GENERATES and tokens.generation_config(hf_config):
        tokens.write_generation_config(directory, hf_config)
    if tokenizer is not None:
        tokens.write_tokenizer(directory, tokenizer, ids, cfg.max_len)
