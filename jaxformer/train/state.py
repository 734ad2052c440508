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
from jaxformer.models import build_model
from jaxformer.parallel.sharding import param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]
    opt_state: optax.OptState


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameter shapes (with logical axes), allocating nothing."""
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def init_params(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """Freshly initialized parameters as a pure dict."""
    return nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(seed))))


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """A TrainState-shaped tree of NamedShardings.

    Optimizer moments mirror their parameter's sharding; scalars (counts) are replicated.
    """
    _, abstract = abstract_model(cfg)
    p_shard = param_shardings(abstract, mesh)
    opt_shapes = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract))
    opt_shard = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, p_shard,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=replicated(mesh), params=p_shard, opt_state=opt_shard)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh) -> TrainState:
    """Initializes parameters and optimizer state directly into their shardings."""
    shardings = state_shardings(cfg, tx, mesh)

    def init() -> TrainState:
        params = init_params(cfg, seed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    shardings = state_shardings(cfg, tx, mesh)

    def init() -> TrainState:
        params = init_params(cfg, 0)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
