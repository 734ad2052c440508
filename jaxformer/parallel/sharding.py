"""Logical axis names -> mesh axes.

Parameters carry logical axis names (see ``jaxformer.nn.params``): ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``experts``, ``layers``, ... Activations use
``batch``, ``length``, ``act_embed``, ``act_heads``, ``act_mlp``, ``act_vocab``. A rules table
maps each name to a tuple of mesh axes (empty: replicated); each ``mesh.preset`` has one (below)
and ``mesh.rules`` replaces single entries. A dimension whose size the mesh axes do not divide
stays replicated (counted in the start-up memory report), so any model runs on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.config import MeshConfig

Rules = dict[str, tuple[str, ...]]

# The batch is split over every axis that does not split the model's own dimensions.
_BATCH = ("data", "fsdp", "expert")

PRESET_RULES: dict[str, Rules] = {
    # Data parallel: weights replicated, rows split.
    "data": {"batch": _BATCH},
    # ZeRO-3 / FSDP: every weight split along one dimension, its embed dimension where it has
    # one (parameters, gradients and optimizer moments alike); XLA all-gathers a layer's
    # weights where it is used. Weights without an embed axis (biases) split along another.
    "fsdp": {"batch": _BATCH, "vocab": ("fsdp",), "embed": ("fsdp",), "mlp": ("fsdp",),
             "heads": ("fsdp",), "kv_heads": ("fsdp",), "head_dim": ("fsdp",),
             "experts": ("expert",)},
    # FSDP + Megatron tensor parallelism: attention heads and the MLP hidden width split on
    # ``tensor`` (column-parallel in, row-parallel out), the vocabulary too.
    "fsdp_tensor": {"batch": _BATCH, "embed": ("fsdp",), "heads": ("tensor",),
                    "kv_heads": ("tensor",), "mlp": ("tensor", "fsdp"),
                    "vocab": ("tensor", "fsdp"), "head_dim": ("fsdp",),
                    "act_heads": ("tensor",), "act_mlp": ("tensor",),
                    "act_vocab": ("tensor",), "experts": ("expert",)},
    # Sequence (context) parallelism: activations split along the sequence; attention gathers
    # keys and values across the ``sequence`` axis. Weights are FSDP-sharded over it too.
    "sequence": {"batch": _BATCH, "length": ("sequence",), "embed": ("fsdp", "sequence")},
    # Expert parallelism: each device holds n_experts / expert experts; tokens travel to their
    # experts (all-to-all) and back.
    "expert": {"batch": _BATCH, "experts": ("expert",)},
}


def rules_for(cfg: MeshConfig) -> Rules:
    """The preset's table with ``cfg.rules`` ("name=axis+axis") applied."""
    rules = dict(PRESET_RULES[cfg.preset])
    for rule in cfg.rules:
        name, _, axes = rule.partition("=")
        rules[name.strip()] = tuple(a.strip() for a in axes.split("+") if a.strip())
    return rules


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules,
                    shape: tuple[int, ...] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec of an array with logical ``axes``.

    With ``shape`` and ``mesh``, a dimension the mapped mesh axes do not divide, or a mesh axis
    an earlier dimension already uses, stays replicated.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                    else mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """NamedShardings for every parameter, as a pure dict matching ``nnx.to_pure_dict``."""
    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("logical_axes", (None,) * len(var.shape))
        return NamedSharding(mesh, logical_to_spec(axes, rules, var.shape, mesh))

    specs = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """The leaves of ``shapes`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs placed by
    the matching leaves of ``shardings``: what lowering or restoring needs without arrays."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [B, T] batch arrays: rows over the batch axes, and with sequence
    parallelism positions over ``sequence``."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh=mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --- activation constraints ----------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxformer_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, ``constrain`` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the current ``activation_sharding`` context, or None outside one."""
    return _ACTIVE.get()


def is_split(name: str) -> bool:
    """Whether activations' logical axis ``name`` is split over more than one device in the
    current ``activation_sharding`` context (False outside one)."""
    active = _ACTIVE.get()
    if active is None:
        return False
    mesh, rules = active
    return math.prod(mesh.shape[a] for a in rules.get(name, ()) if a in mesh.shape) > 1


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical ``axes``; the identity outside
    ``activation_sharding`` (single-device use, inference, tests of modules)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
