"""Building a model from its config: abstract shapes, fresh parameters, the looped layout.

These are what every layer above needs to make a model without a device or an optimizer:
training (the state), checkpoints (the restore target), inference, export and analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import build_model
from jaxformer.models.layer_stack import unstack_params


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameter shapes (with logical axes), allocating nothing."""
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def looped(cfg: ModelConfig, params: dict[str, Any]
           ) -> tuple[ModelConfig, nnx.GraphDef, dict[str, Any]]:
    """The model with its blocks as a Python list (what KV-cache decoding, export and analysis
    use), whatever layout ``params`` were trained in -> (config, graphdef, params)."""
    if cfg.scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=False)
        params = unstack_params(params)
    return cfg, abstract_model(cfg)[0], params


def init_params(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """Freshly initialized parameters as a pure dict."""
    return nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(seed))))
