"""Logical axis names -> mesh axes.

Parameters carry logical axis names (see ``jaxformer.nn.params``); activations use ``batch``
and ``length``. The rules table below maps each name to a mesh axis or None (replicated). For
now every weight is replicated and the batch is split over ``data``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: dict[str, str | None] = {
    "batch": "data",
    "length": None,
    "vocab": None,
    "embed": None,
    "heads": None,
    "head_dim": None,
    "mlp": None,
}


def logical_to_spec(axes: tuple[str | None, ...],
                    rules: dict[str, str | None] = DEFAULT_RULES) -> PartitionSpec:
    return PartitionSpec(*(None if a is None else rules.get(a) for a in axes))


def param_shardings(abstract_state: nnx.State, mesh: Mesh,
                    rules: dict[str, str | None] = DEFAULT_RULES) -> dict[str, Any]:
    """NamedShardings for every parameter, as a pure dict matching ``nnx.to_pure_dict``."""
    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("logical_axes", (None,) * len(var.shape))
        return NamedSharding(mesh, logical_to_spec(axes, rules))

    specs = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def batch_sharding(mesh: Mesh, rules: dict[str, str | None] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of [B, T] batch arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
