"""Router statistics of mixture-of-experts layers, recorded during a forward pass.

Each MoE block records its ``stats`` (``load_balance_loss``, ``router_z_loss``,
``dropped_fraction`` scalars and ``expert_load`` [E]) as an ``nnx.Intermediate`` when the
forward pass runs under ``nnx.capture``; a scanned layer stack records them stacked [L, ...].
``collect_moe_stats`` averages them over layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

STAT_NAMES = ("load_balance_loss", "router_z_loss", "dropped_fraction", "expert_load")


def record(module: nnx.Module, name: str, value: object) -> None:
    """``module.sow(nnx.Intermediate, name, value)`` when an ``nnx.capture`` is collecting
    (training); outside one (inference) nothing is stored. Flax marks a module under capture
    with ``__captures__``; sowing outside a capture is deprecated."""
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)


def collect_moe_stats(intermediates: nnx.State | dict) -> dict[str, jax.Array]:
    """Means over MoE layers of each statistic found in ``intermediates`` (any nesting, e.g.
    ``{"blocks": {0: {"moe_stats": ({...},)}}}`` or one stacked [L] entry of a scanned stack).

    -> {"load_balance_loss", "router_z_loss", "dropped_fraction": scalars, "expert_load": [E]};
    all zeros (expert_load of size 1) when there is no MoE layer.
    """
    tree = nnx.to_pure_dict(intermediates) if isinstance(intermediates, nnx.State) \
        else intermediates
    found: dict[str, list[jax.Array]] = {name: [] for name in STAT_NAMES}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = getattr(path[-1], "key", None)
        if key in found:
            found[key].append(jnp.asarray(leaf, jnp.float32))
    out = {}
    for name, values in found.items():
        if not values:
            out[name] = jnp.zeros((1,) if name == "expert_load" else (), jnp.float32)
        elif name == "expert_load":
            n_experts = values[0].shape[-1]
            out[name] = jnp.concatenate([v.reshape(-1, n_experts) for v in values]).mean(0)
        else:
            out[name] = jnp.concatenate([v.reshape(-1) for v in values]).mean()
    return out
