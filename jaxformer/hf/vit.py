"""ViT (``ViTForImageClassification``, Dosovitskiy et al. 2021) -> jaxformer's image encoder.

Import only: a transformers ViT classifier becomes ``presets.vit`` with ``patch_size``,
``image_size``, ``image_channels``, ``num_labels``, ``norm_eps`` (1e-12 in ViTConfig) and
``pooler=False`` (the classifier reads the final [CLS] state itself: transformers builds
``ViTModel(add_pooling_layer=False)`` and applies ``classifier`` to ``sequence_output[:, 0]``).

Layouts (letters: D width, C channels, P patch side, N heads, H head dim, T tokens):

    patch_embeddings.projection.weight  [D, C, P, P] (a Conv2d over [B, C, H, W])
        -> patches/w [P*P*C, D]: row (i*P + j)*C + c is kernel [:, c, i, j], the pixel-rows-
           outer, channels-inner order of ``models.vision.patchify`` over [B, H, W, C]
    embeddings.cls_token [1, 1, D]          -> patches/cls [D]
    embeddings.position_embeddings [1, T, D] -> inputs/positions/table [max_len = T, D]
        ([CLS] at 0, patch n at n + 1: our learned positions over the token index)
    torch Linear [out, in]                  -> ours [in, out] (q/k/v split into [D, N, H])

Pixels go in as [B, H, W, C] (channels last) with the image processor's normalization already
applied (``ViTImageProcessor``: resize, rescale to [0, 1], (x - mean) / std): the model
itself does none, in either library.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import (
    Rule,
    dense_rules,
    flat,
    in_major,
    layernorm_rules,
    out_major,
    transpose,
)
from jaxformer.models import presets

MODEL_TYPE = "vit"
ARCHITECTURE = "ViTForImageClassification"
GENERATES = False

# hidden_act in config.json -> our activation names (ViT's default is exact erf "gelu").
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}


def _side(hf: dict, key: str) -> int:
    """An int, or a [h, w] pair of equal sides (ViTConfig takes both) -> the side."""
    value = hf[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFConversionError(f"ViT {key}={list(value)} is not square; jaxformer's image "
                                    f"encoder takes square images and patches")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFConversionError(f"ViT {key}={value!r} is not a positive integer")
    return value


def _num_labels(hf: dict) -> int:
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def model_config(hf: dict) -> ModelConfig:
    archs = hf.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise HFConversionError(f"ViT architectures {archs} are not supported (only "
                                f"{ARCHITECTURE}: jaxformer's image encoder is a classifier)")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise HFConversionError(f"ViT hidden_act {act!r} is not supported "
                                f"({', '.join(ACTIVATIONS)} are)")
    if not hf.get("qkv_bias", True):
        raise HFConversionError("ViT with qkv_bias=false is not supported (jaxformer's "
                                "attention has query/key/value biases with model.use_bias)")
    image, patch = _side(hf, "image_size"), _side(hf, "patch_size")
    if image % patch:
        raise HFConversionError(f"ViT image_size={image} is not divisible by "
                                f"patch_size={patch}")
    labels = _num_labels(hf)
    if labels < 2:
        raise HFConversionError(f"ViT with {labels} label(s) is not supported (jaxformer's "
                                "image classifier needs num_labels >= 2)")
    tokens = (image // patch) ** 2 + 1
    return presets.vit(
        n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        activation=ACTIVATIONS[act], norm_eps=hf.get("layer_norm_eps", 1e-12),
        init_std=hf.get("initializer_range", 0.02), patch_size=patch, image_size=image,
        image_channels=int(hf.get("num_channels", 3)), num_labels=labels, max_len=tokens,
        pooler=False, vocab_size=1)


def hf_config(cfg: ModelConfig) -> dict:
    raise HFConversionError("export to a transformers ViT is not supported (import only)")


def check_exportable(cfg: ModelConfig) -> None:
    raise HFConversionError("export to a transformers ViT is not supported (import only)")


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    return {}


def _patch_kernel(cfg: ModelConfig) -> tuple[Callable, Callable]:
    p, c = cfg.patch_size, cfg.image_channels

    def to_ours(x: np.ndarray) -> np.ndarray:  # [D, C, P, P] -> [P (row), P (col), C, D]
        return np.asarray(x).transpose(2, 3, 1, 0).reshape(p * p * c, -1)

    def to_theirs(x: np.ndarray) -> np.ndarray:
        return x.reshape(p, p, c, -1).transpose(3, 2, 0, 1)

    return to_ours, to_theirs


def _leading_ones(x: np.ndarray) -> np.ndarray:
    """Ours [..., D] -> theirs [1, (1,) ..., D] (cls [1, 1, D], positions [1, T, D])."""
    return x.reshape(1, *((1,) if x.ndim == 1 else ()), *x.shape)


def rules(cfg: ModelConfig) -> list[Rule]:
    """Names as ``save_pretrained`` writes them (transformers 4 and 5 alike)."""
    emb = "vit.embeddings."
    to_ours, to_theirs = _patch_kernel(cfg)
    out = [Rule("patches/w", emb + "patch_embeddings.projection.weight", to_ours=to_ours,
                to_theirs=to_theirs),
           Rule("patches/b", emb + "patch_embeddings.projection.bias"),
           Rule("patches/cls", emb + "cls_token", to_theirs=_leading_ones),
           Rule("inputs/positions/table", emb + "position_embeddings",
                to_theirs=_leading_ones)]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks/{i}/", f"vit.encoder.layer.{i}."
        for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
            out += [Rule(ours + f"attn/w_{p}", theirs + f"attention.attention.{name}.weight",
                         to_ours=transpose, to_theirs=in_major),
                    Rule(ours + f"attn/b_{p}", theirs + f"attention.attention.{name}.bias",
                         to_theirs=flat)]
        out += [Rule(ours + "attn/w_out", theirs + "attention.output.dense.weight",
                     to_ours=transpose, to_theirs=out_major),
                Rule(ours + "attn/b_out", theirs + "attention.output.dense.bias"),
                *layernorm_rules(ours + "attn_norm", theirs + "layernorm_before"),
                Rule(ours + "mlp/wi", theirs + "intermediate.dense.weight",
                     to_ours=transpose, to_theirs=transpose),
                Rule(ours + "mlp/bi", theirs + "intermediate.dense.bias"),
                Rule(ours + "mlp/wo", theirs + "output.dense.weight", to_ours=transpose,
                     to_theirs=transpose),
                Rule(ours + "mlp/bo", theirs + "output.dense.bias"),
                *layernorm_rules(ours + "mlp_norm", theirs + "layernorm_after")]
    return out + [*layernorm_rules("final_norm", "vit.layernorm"),
                  *dense_rules("classifier", "classifier")]
