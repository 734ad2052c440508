"""Train state: step, parameters (a pure dict) and optimizer state, created already sharded."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.config import ModelConfig
from jaxformer.models import build_model
from jaxformer.models.layer_stack import unstack_params
from jaxformer.parallel.sharding import PRESET_RULES, Rules, param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]
    opt_state: optax.OptState


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


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """A TrainState-shaped tree of NamedShardings (``rules`` default: data parallel).

    Optimizer moments mirror their parameter's sharding; scalars (counts) are replicated.
    """
    _, abstract = abstract_model(cfg)
    p_shard = param_shardings(abstract, mesh, PRESET_RULES["data"] if rules is None else rules)
    opt_shapes = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract))
    opt_shard = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, p_shard,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=replicated(mesh), params=p_shard, opt_state=opt_shard)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """Initializes parameters and optimizer state directly into their shardings: the jitted
    init's ``out_shardings`` make each device compute only its own shards, so no device ever
    holds the full model."""
    shardings = state_shardings(cfg, tx, mesh, rules)

    def init() -> TrainState:
        params = init_params(cfg, seed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                         mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints (orbax reshards a
    checkpoint written on any mesh onto these shardings)."""
    shardings = state_shardings(cfg, tx, mesh, rules)

    def init() -> TrainState:
        params = init_params(cfg, 0)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
