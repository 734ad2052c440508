"""Train state: step, parameters (a pure dict) and optimizer state, created already sharded."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.config import ModelConfig
from jaxformer.models.build import abstract_model, init_params
from jaxformer.parallel.sharding import (
    PRESET_RULES,
    Rules,
    param_shardings,
    replicated,
    with_shardings,
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]
    opt_state: optax.OptState


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
    return with_shardings(shapes, shardings)
