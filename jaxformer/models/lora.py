"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the adapters'
math on parameter trees, free of training and of run dirs.

A targeted kernel ``W`` [*in, *out] (``w_q`` [D, N, H] has in = (D,), ``w_out`` [N, H, D] has
in = (N, H)) gets two adapters, stored flat over its input and output axes:

    A [I, r]  with I = prod(in),  drawn from N(0, 1/I) (the paper's random Gaussian)
    B [r, O]  with O = prod(out), zeros, so an untrained adapter changes nothing
    W' = W + (alpha / r) * (A @ B).reshape(W.shape)

With ``model.scan_layers`` the kernels carry a leading ``layers`` axis [L, *in, *out] and the
adapters one too (A [L, I, r], B [L, r, O]): one pair per layer, as in the looped layout.

Adapters are a pytree beside the parameters, ``{"blocks": {0: {"attn": {"w_q": {"a": A,
"b": B}}}}}`` (the kernel's path, then ``a``/``b``), and ``merge`` folds them into the
weights. Which kernels are adaptable is decided by name and rank (``ADAPTABLE``): the attention
projections of every attention module named ``*attn`` (self- and cross-attention) and the dense
feed-forward kernels; MoE experts (an extra ``experts`` axis) are not.

With ``lora.dropout > 0`` the adapters are not merged: ``attach_branches`` hangs each pair on
the module of its kernel, which adds ``factor * (drop(x) A) B`` itself (``nn.lora_branch``).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError, LoraConfig
from jaxformer.models.build import abstract_model
from jaxformer.nn.lora_branch import attach

# kernel name -> (number of leading input axes, rank in the looped layout)
ADAPTABLE = {"w_q": (1, 3), "w_k": (1, 3), "w_v": (1, 3), "w_out": (2, 3),
             "wi": (1, 2), "wi_gate": (1, 2), "wi_up": (1, 2), "wo": (1, 2)}
_MODULE = {"w_q": "attn", "w_k": "attn", "w_v": "attn", "w_out": "attn",
           "wi": "mlp", "wi_gate": "mlp", "wi_up": "mlp", "wo": "mlp"}
STACKS = ("blocks", "encoder", "decoder")  # models.layer_stack.STACKS: scanned when unindexed

SHORTHANDS = {"q": r"attn/w_q$", "k": r"attn/w_k$", "v": r"attn/w_v$", "o": r"attn/w_out$",
              "mlp": r"(^|/)mlp/(wi|wi_gate|wi_up|wo)$"}
SHORTHANDS["all"] = "|".join(f"({p})" for p in SHORTHANDS.values())


def _key(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", entry))


def path_name(path: tuple[Any, ...]) -> str:
    """"blocks/0/attn/w_q" of a tree path (as ``runs.checkpoint.param_layout`` names it)."""
    return "/".join(str(_key(k)) for k in path)


def kernel_split(name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(leading layer axes, input axes) of an adaptable kernel at path ``name``, else None."""
    parts = name.split("/")
    leaf = parts[-1]
    if leaf not in ADAPTABLE or len(parts) < 2:
        return None
    module = parts[-2]
    if not (module == _MODULE[leaf] or (_MODULE[leaf] == "attn" and module.endswith("attn"))):
        return None
    stacked = int(parts[0] in STACKS and len(parts) > 1 and not parts[1].isdigit())
    n_in, rank = ADAPTABLE[leaf]
    if len(shape) != rank + stacked:  # e.g. MoE experts [E, D, F]
        return None
    return stacked, n_in


def adaptable_kernels(params: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, int]]]:
    """{path name: (shape, (leading layer axes, input axes))} of every adaptable kernel of
    ``params`` (arrays or ShapeDtypeStructs)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        split = kernel_split(name, tuple(leaf.shape))
        if split is not None:
            out[name] = (tuple(leaf.shape), split)
    return out


def pattern(target: str) -> str:
    """The regex of a ``lora.targets`` entry (a shorthand, or the entry itself)."""
    return SHORTHANDS.get(target, target)


def select_targets(params: Any, targets: tuple[str, ...]) -> list[str]:
    """The sorted path names of the adaptable kernels that some target's regex finds. A
    target that finds none (or is not a valid regex) is a ConfigError naming it."""
    kernels = adaptable_kernels(params)
    chosen: set[str] = set()
    for target in targets:
        try:
            regex = re.compile(pattern(target))
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}: overflow
            raise ConfigError(f"bad value for lora.targets: {target!r} is not a regular "
                              f"expression ({e})") from None
        found = {name for name in kernels if regex.search(name)}
        if not found:
            examples = ", ".join(sorted(kernels)[:3]) or "none"
            raise ConfigError(f"bad value for lora.targets: {target!r} matches no parameter "
                              f"LoRA adapts (adaptable kernels: {len(kernels)}, e.g. {examples});"
                              f" use {', '.join(SHORTHANDS)} or a regex of such paths")
        chosen |= found
    return sorted(chosen)


def scale(cfg: LoraConfig) -> float:
    """alpha / r: the paper's scaling, so that retuning r need not retune the learning rate."""
    return cfg.alpha / cfg.rank


def _nest(flat: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for keys, value in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def adapter_shapes(params: Any, cfg: LoraConfig) -> dict[Any, Any]:
    """The adapters of ``params`` as ShapeDtypeStructs (float32), nested like ``params``."""
    names = set(select_targets(params, cfg.targets))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        if name not in names:
            continue
        lead, n_in = kernel_split(name, tuple(leaf.shape))
        shape = tuple(leaf.shape)
        layers, rest = shape[:lead], shape[lead:]
        i, o = math.prod(rest[:n_in]), math.prod(rest[n_in:])
        keys = tuple(_key(k) for k in path)
        flat[keys + ("a",)] = jax.ShapeDtypeStruct((*layers, i, cfg.rank), jnp.float32)
        flat[keys + ("b",)] = jax.ShapeDtypeStruct((*layers, cfg.rank, o), jnp.float32)
    return _nest(flat)


def init_adapters(params: Any, cfg: LoraConfig, seed: int) -> dict[Any, Any]:
    """Fresh adapters of ``params``: A ~ N(0, 1/I) (a pure function of ``seed`` and the
    kernel's path), B = 0, so the merged model is exactly the base model."""
    shapes = adapter_shapes(params, cfg)
    key = jax.random.key(seed)

    def draw(path: tuple[Any, ...], s: jax.ShapeDtypeStruct) -> jax.Array:
        if _key(path[-1]) == "b":
            return jnp.zeros(s.shape, s.dtype)
        # The path's name, not its index among the targets: adding a target leaves the other
        # adapters' draws as they were.
        k = jax.random.fold_in(key, _name_hash(path_name(path[:-1])))
        return jax.random.normal(k, s.shape, s.dtype) * s.shape[-2] ** -0.5

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _name_hash(name: str) -> int:
    """A stable 31-bit hash of a path name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def delta(kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array, factor: float) -> jax.Array:
    """``factor * A @ B`` [*lead, I, O] in float32, shaped as the kernel."""
    product = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    return (factor * product).reshape(kernel_shape)


def merge(params: Any, adapters: Any, factor: float) -> Any:
    """``params`` with every adapted kernel replaced by ``W + factor * A @ B`` (added in
    float32, back in W's dtype; other leaves are returned as they are, not copied)."""
    flat = {path_name(p[:-1]) + "/" + str(_key(p[-1])): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}

    def fold(path: tuple[Any, ...], w: jax.Array) -> jax.Array:
        name = path_name(path)
        if name + "/a" not in flat:
            return w
        d = delta(w.shape, flat[name + "/a"], flat[name + "/b"], factor)
        return (w.astype(jnp.float32) + d).astype(w.dtype)

    unused = {n.rsplit("/", 1)[0] for n in flat} - {
        path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    if unused:
        raise ValueError(f"adapters for kernels the parameters lack: {sorted(unused)[:3]}")
    return jax.tree_util.tree_map_with_path(fold, params)


def owner(model: nnx.Module, name: str) -> nnx.Module:
    """The module of ``model`` that holds the kernel at path ``name`` ("blocks/0/attn/w_q")."""
    node: Any = model
    for part in name.split("/")[:-1]:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def attach_branches(model: nnx.Module, adapters: Any, factor: float, rate: float,
                    key: jax.Array) -> None:
    """Attaches every adapter pair of ``adapters`` to the module of its kernel as a LoRA branch
    (``nn.lora_branch``): ``x W0 + factor * (drop(x) A) B`` with dropout at ``rate``. Each
    kernel's dropout key is ``key`` folded with its path (one per layer in a scanned stack),
    so the masks of different kernels and layers are independent."""
    flat = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    for name in sorted({n.rsplit("/", 1)[0] for n in flat}):
        a, b = flat[name + "/a"], flat[name + "/b"]
        k = jax.random.fold_in(key, _name_hash(name))
        if a.ndim == 3:  # a scanned stack: one key per layer, sliced with the weights
            k = jax.random.split(k, a.shape[0])
        attach(owner(model, name), name.rsplit("/", 1)[1], a, b, k, factor, rate)


def check_branches(cfg: Config) -> None:
    """With ``lora.dropout > 0`` the adapters run as branches: each targeted kernel's module
    must run them (``LORA_BRANCH``), and the stack must not recompute or chunk them in a way
    that would repeat a mask (a one-line ConfigError otherwise)."""
    rate = cfg.lora.dropout
    if cfg.model.reversible:
        raise ConfigError(f"lora.dropout={rate} runs the adapters as branches, which "
                          "model.reversible's recomputed blocks do not take; set lora.dropout=0")
    graphdef, abstract = abstract_model(cfg.model)
    model = nnx.merge(graphdef, abstract)
    for name in select_targets(nnx.to_pure_dict(abstract), cfg.lora.targets):
        module = owner(model, name)
        if not getattr(type(module), "LORA_BRANCH", False):
            raise ConfigError(f"lora.dropout={rate} needs LoRA branches, which "
                              f"{type(module).__name__} ({name}) does not run; set "
                              "lora.dropout=0 or leave its kernels out of lora.targets")
        if cfg.model.ff_chunks > 1 and _MODULE[name.rsplit("/", 1)[1]] == "mlp":
            raise ConfigError(f"lora.dropout={rate} on the feed-forward ({name}) would repeat "
                              f"one dropout mask over model.ff_chunks={cfg.model.ff_chunks} "
                              "chunks; set model.ff_chunks=1 or lora.dropout=0")


def count(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def check_targets(cfg: Config) -> None:
    """The config check of ``lora.targets``: with LoRA on, every target must find an adaptable
    kernel of the model (a one-line ConfigError names the first that does not)."""
    if cfg.lora.rank <= 0:
        if cfg.lora.dropout > 0:
            raise ConfigError(f"lora.dropout={cfg.lora.dropout} drops the adapters' inputs, and "
                              "lora.rank=0 has no adapters; set lora.rank > 0 or lora.dropout=0")
        return
    if cfg.model.feature_redraw > 0:  # the redraw rewrites weights that LoRA keeps frozen
        raise ConfigError(f"lora.rank={cfg.lora.rank} keeps the base's weights fixed, and "
                          f"model.feature_redraw={cfg.model.feature_redraw} redraws some of "
                          "them; set model.feature_redraw=0")
    if not cfg.lora.targets:
        raise ConfigError("bad value for lora.targets: () selects nothing; name at least one "
                          f"target ({', '.join(SHORTHANDS)} or a regex of parameter paths)")
    select_targets(nnx.to_pure_dict(abstract_model(cfg.model)[1]), cfg.lora.targets)
    if cfg.lora.dropout > 0:
        check_branches(cfg)


config_lib.register_check(check_targets)
