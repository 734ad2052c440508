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

Reversible blocks (``model.reversible``, ``apply_reversible``) run the stack as a RevNet whose
backward pass recomputes every block's inputs from its outputs (``nn/reversible.py``), so
the activations kept for the backward pass are one block's whatever the depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import (
    AttentionInputs,
    attention_branch,
    feed_forward_branch,
    split_rng,
)
from jaxformer.nn.moe_stats import record
from jaxformer.nn.reversible import reversible_stack
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
                 rngs: list[jax.Array | None], call: Callable[..., jnp.ndarray],
                 inputs: AttentionInputs | None = None) -> jnp.ndarray:
    """Runs ``x`` [B, T, D] through the stack: ``call(block, x, rng) -> x`` per block, with
    ``rngs`` one dropout key (or None) per block. The residual stream is pinned to the mesh
    (``batch``, ``length``, ``act_embed``) after every block. With ``model.reversible`` the
    blocks run as reversible layers instead (``apply_reversible``, on the stack's self-attention
    ``inputs``; ``call`` is not used)."""
    if cfg.reversible:
        if inputs is None:
            raise ValueError("model.reversible runs self-attention stacks: apply_blocks needs "
                             "their attention inputs")
        return apply_reversible(blocks, cfg, x, inputs, rngs)
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


_BRANCHES = {"f": ("attn_norm", "attn"), "g": ("mlp_norm", "mlp")}  # block submodules


def apply_reversible(blocks: nnx.Module, cfg: ModelConfig, x: jnp.ndarray,
                     inputs: AttentionInputs, rngs: list[jax.Array | None]) -> jnp.ndarray:
    """Runs ``x`` [B, T, D] through the stack as reversible layers (``model.reversible``;
    Gomez et al. 2017, Kitaev et al. 2020): the two halves of the residual stream start equal,
    (X1, X2) = (x, x); block l maps them to Y1 = X1 + Attention_l(norm(X2)),
    Y2 = X2 + FeedForward_l(norm(Y1)); the stack returns their mean (Y1 + Y2) / 2 [B, T, D],
    so the final norm, the heads and the parameter tree are those of the plain model.

    The layers run inside ``nn.reversible.reversible_stack`` (a custom_vjp whose backward pass
    rebuilds each block's inputs from its outputs): its F and G close over nothing traced. The
    block parameters reach them as arguments (``nnx.split`` of each block's attention and
    feed-forward halves, stacked over layers: a looped stack is stacked here, a scanned one
    already is), each block's dropout key with them (the backward pass redraws the same
    masks), and the attention inputs (positions, masks, a learned relative bias: whose
    gradient is summed over layers) as the shared context. ``rngs``: one key (or None) per
    block, as ``apply_blocks``.
    """
    if isinstance(blocks, nnx.List):
        if any(getattr(block.attn, "capture_attention", False) for block in blocks):
            # Capturing attention maps (analysis): the same forward through the real modules.
            return reversible_loop(blocks, x, inputs, rngs)
        splits = [_split_branches(block) for block in blocks]
        graphdefs = splits[0][0]
        params = jax.tree.map(lambda *a: jnp.stack(a), *[state for _, state in splits])
    else:
        graphdefs, params = _split_branches(blocks)
    keys = None if rngs[0] is None else jnp.stack(rngs)
    context, static = {}, {}
    for field in dataclasses.fields(inputs):
        value = getattr(inputs, field.name)
        (context if isinstance(value, (jax.Array, np.ndarray)) else static)[field.name] = value

    def branch(name: str) -> Callable[..., jnp.ndarray]:
        norm_name, module_name = _BRANCHES[name]

        def fn(p: dict[str, Any], h: jnp.ndarray, ctx: dict[str, Any]) -> jnp.ndarray:
            norm = nnx.merge(graphdefs[norm_name], p[norm_name])
            module = nnx.merge(graphdefs[module_name], p[module_name])
            block_rngs = split_rng(p["key"], 5)
            if name == "f":
                y, _ = attention_branch(cfg, norm, module, h, AttentionInputs(**ctx, **static),
                                        rngs=block_rngs)
            else:
                y = feed_forward_branch(cfg, norm, module, h, block_rngs)
            return constrain(y, ("batch", "length", "act_embed"))

        return fn

    p_f = {**{k: params[k] for k in _BRANCHES["f"]}, "key": keys}
    p_g = {**{k: params[k] for k in _BRANCHES["g"]}, "key": keys}
    x = constrain(x, ("batch", "length", "act_embed"))
    y1, y2 = reversible_stack(branch("f"), branch("g"), p_f, p_g, x, x, context=context)
    return 0.5 * (y1 + y2)


def reversible_loop(blocks: nnx.Module, x: jnp.ndarray, inputs: AttentionInputs,
                    rngs: list[jax.Array | None]) -> jnp.ndarray:
    """The math of ``apply_reversible`` as a plain loop over the blocks (autodiff stores every
    activation): what decoding runs, and the yardstick of the custom_vjp."""
    x1 = x2 = x
    for block, rng in zip(blocks, rngs, strict=True):
        x1, x2, _ = block.reversible_step(x1, x2, inputs, dropout_rng=rng)
    return 0.5 * (x1 + x2)


def _split_branches(block: nnx.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """A block's norms, attention and feed-forward -> ({name: graphdef}, {name: state})."""
    graphdefs, states = {}, {}
    for name in (*_BRANCHES["f"], *_BRANCHES["g"]):
        graphdefs[name], states[name] = nnx.split(getattr(block, name))
    return graphdefs, states


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
