"""A stack of Transformer blocks: a Python loop over separate blocks, or one scanned block
with stacked weights; either with rematerialization by policy name.

Scanning (``model.scan_layers``) compiles the block once however deep the model is, which
keeps compile time and program size flat for deep models; its weights then carry a leading
``layers`` axis (param paths ``blocks/attn/w_q`` [L, ...] instead of ``blocks/0/attn/w_q``).
Inference, Hugging Face export and fine-tuning read checkpoints in the looped layout:
``unstack_params`` converts.

Remat (``model.remat``) recomputes a block's activations in the backward pass instead of
storing them: ``full`` saves only the block inputs, ``save_dots`` keeps every matmul output,
``save_dots_no_batch`` keeps matmuls without batch dimensions (weights-times-activations,
not attention scores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.nn.moe_stats import record
from jaxformer.parallel.sharding import constrain

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

STACKS = ("blocks", "encoder", "decoder")  # the attribute names of block stacks


def make_blocks(cfg: ModelConfig, n: int, make: Callable[[int, nnx.Rngs], nnx.Module],
                rngs: nnx.Rngs) -> nnx.Module:
    """``n`` blocks ``make(i, rngs)``: an ``nnx.List``, or with ``cfg.scan_layers`` one block
    whose parameters are stacked [n, ...] with the logical axis ``layers`` in front."""
    if not cfg.scan_layers:
        return nnx.List([make(i, rngs) for i in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(0, r)

    stacked = create(rngs)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes", (None,) * (var.ndim - 1))
            var.set_metadata(logical_axes=("layers", *axes))
    return stacked


def apply_blocks(owner: nnx.Module, blocks: nnx.Module, cfg: ModelConfig, x: jnp.ndarray,
                 rngs: list[jax.Array | None], call: Callable[..., jnp.ndarray]) -> jnp.ndarray:
    """Runs ``x`` [B, T, D] through the stack: ``call(block, x, rng) -> x`` per block, with
    ``rngs`` one dropout key (or None) per block. The residual stream is pinned to the mesh
    (``batch``, ``length``, ``act_embed``) after every block."""
    policy = cfg.remat

    def one(block: nnx.Module, h: jnp.ndarray, rng: jax.Array | None) -> jnp.ndarray:
        return constrain(call(block, h, rng), ("batch", "length", "act_embed"))

    if isinstance(blocks, nnx.List):
        step = one if policy == "none" else nnx.remat(one, policy=REMAT_POLICIES[policy])
        for block, rng in zip(blocks, rngs, strict=False):
            x = step(block, x, rng)
        return x

    keys = None if rngs[0] is None else jnp.stack(rngs)

    def body(block: nnx.Module, h: jnp.ndarray, rng: jax.Array | None):
        # Router statistics recorded inside the scan come out as its stacked [L, ...] output.
        return nnx.capture(one, nnx.Intermediate)(block, h, rng)

    if policy != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[policy])
    scan = nnx.scan(body, in_axes=(0, nnx.Carry, None if keys is None else 0),
                    out_axes=(nnx.Carry, 0))
    x, stats = scan(blocks, x, keys)
    record(owner, "scanned_stats", nnx.to_pure_dict(stats))
    return x


def is_stacked(tree: Any) -> bool:
    """Whether a stack's parameter dict is in the scanned layout (no integer layer keys)."""
    return isinstance(tree, dict) and bool(tree) and not any(isinstance(k, int) for k in tree)


def unstack_params(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned layout -> looped layout: ``blocks: {attn: [L, ...]}`` -> ``blocks: {0: ...}``."""
    out = dict(params)
    for name in STACKS:
        if name in out and is_stacked(out[name]):
            n = jax.tree.leaves(out[name])[0].shape[0]
            out[name] = {i: jax.tree.map(lambda a, i=i: a[i], out[name]) for i in range(n)}
    return out


def stack_params(params: dict[str, Any]) -> dict[str, Any]:
    """Looped layout -> scanned layout (the inverse of ``unstack_params``)."""
    out = dict(params)
    for name in STACKS:
        if name in out and isinstance(out[name], dict) and not is_stacked(out[name]):
            layers = [out[name][i] for i in sorted(out[name])]
            out[name] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return out
