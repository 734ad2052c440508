"""Weight-only quantization: INT8 per output channel, INT4 group-wise, dequantized in the jit.

``jaxformer quantize RUN_DIR --bits 8|4 --out DIR`` writes a new run dir whose checkpoint holds
integer weights with float scales; ``sample`` and ``serve`` load it (``load_quantized``) and
keep the integers in memory: the decoding step turns them back into floats inside its jitted
function (``DecoderFamily(..., unpack=dequantize)``), so the weights' memory is what is saved.

What is quantized: every matmul weight, i.e. attention ``w_q w_k w_v w_out`` (and the MLA
projections), feed-forward and MoE expert ``wi wi_gate wi_up wo``, ``lm_head``, the encoder
heads' ``w``, and the token embedding ``embed/table`` (rows are gathered, and a tied model
multiplies by it too: one scale per row is per output channel in both uses). What stays float:
norms, biases, learned position and token-type tables, relative-position biases and the MoE
router (small, and the router makes discrete choices).

Scheme (symmetric, no zero point), for a weight W whose contraction (input) axes hold K values
per output channel:

- INT8: per output channel, ``scale = max|W[:, c]| / 127``, ``q = round(W / scale)`` in
  [-127, 127], stored as int8 (1 byte) with float32 scales.
- INT4: per group of ``g`` consecutive contraction values of one output channel,
  ``scale = max|group| / 7``, ``q`` in [-7, 7], two values packed per byte (low nibble first,
  in the weight's row-major order) with float16 scales (rounded up, so that no value clips).
  ``g = group_size`` (default 128) when it divides K; K itself when K <= group_size; otherwise
  the largest divisor of K below group_size (d_model 192 with 128: groups of 96). A K with no
  divisor in [group_size / 2, group_size] is refused (choose another ``--group-size``).

So ``|W - dequantize(q)| <= scale / 2`` element-wise. Letters: K contraction length, G groups
per output channel (K / g), g group length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.objectives.loss import cross_entropy_sums
from jaxformer.objectives.registry import get_objective
from jaxformer.objectives.tasks import build_task
from jaxformer.runs import rundir, specials
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import abstract_params, load_run, read_run_config

QUANT_FILE = "quantization.json"
FORMAT = 1
BITS = (8, 4)
DEFAULT_GROUP_SIZE = 128

# Weights whose contraction axis is the first (x @ W with W [in, ...]).
_FIRST_AXIS = frozenset({"w_q", "w_k", "w_v", "w_dq", "w_uq", "w_dkv", "w_kr", "w_uk", "w_uv",
                         "lm_head", "w"})
# Feed-forward weights: [in, out], or [experts, in, out] in an MoE layer (the expert axis is a
# batch axis: each expert's channels get their own scales).
_FFN = frozenset({"wi", "wi_gate", "wi_up", "wo"})


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight was quantized (static: part of the pytree's structure, not its data)."""

    bits: int  # 8 or 4
    shape: tuple[int, ...]  # the float weight's shape
    dtype: str  # the float weight's dtype ("float32", "bfloat16")
    axes: tuple[int, ...]  # its contraction axes (consecutive)
    group: int  # contraction values per scale (K for INT8: one scale per output channel)

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        """The weight reshaped so that each scale covers one slice along axis ``len(pre)+1``:
        shape[:a0] + (G, g) + shape[a_last + 1:]."""
        a0, a1 = self.axes[0], self.axes[-1] + 1
        k = math.prod(self.shape[a0:a1])
        return (*self.shape[:a0], k // self.group, self.group, *self.shape[a1:])

    @property
    def scale_shape(self) -> tuple[int, ...]:
        g = list(self.grouped_shape)
        g[self.axes[0] + 1] = 1
        return tuple(g)

    @property
    def values_shape(self) -> tuple[int, ...]:
        """int8 storage: the weight's shape (INT8), or the flat packed nibbles (INT4)."""
        n = math.prod(self.shape)
        return self.shape if self.bits == 8 else ((n + 1) // 2,)

    @property
    def scale_dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.bits == 8 else np.dtype(np.float16)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "shape": list(self.shape), "dtype": self.dtype,
                "axes": list(self.axes), "group": self.group}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(int(d["bits"]), tuple(d["shape"]), str(d["dtype"]), tuple(d["axes"]),
                   int(d["group"]))


@jax.tree_util.register_pytree_node_class
class QTensor:
    """One quantized weight: ``values`` int8 (``spec.values_shape``) and ``scales``
    (``spec.scale_shape``, float32 for INT8, float16 for INT4)."""

    def __init__(self, values: Any, scales: Any, spec: QuantSpec):
        self.values, self.scales, self.spec = values, scales, spec

    def tree_flatten(self) -> tuple[tuple[Any, Any], QuantSpec]:
        return (self.values, self.scales), self.spec

    @classmethod
    def tree_unflatten(cls, spec: QuantSpec, children: tuple[Any, Any]) -> QTensor:
        return cls(*children, spec)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    def __repr__(self) -> str:
        return f"QTensor(int{self.spec.bits}, shape={self.spec.shape}, group={self.spec.group})"


# The parameters with QTensor leaves in place of the quantized weights (same nesting).
QuantizedParams = dict[str, Any]


def _is_q(x: Any) -> bool:
    return isinstance(x, QTensor)


def _key(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def contraction_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The contraction axes of the weight at ``path`` (its keys), or None to keep it float."""
    name, parent = path[-1], (path[-2] if len(path) > 1 else "")
    if len(shape) < 2:
        return None
    if name in _FIRST_AXIS:
        return (0,)
    if name in _FFN:
        return (len(shape) - 2,)
    if name == "w_out":  # [heads, head_dim, d_model]: contracts heads x head_dim
        return tuple(range(len(shape) - 1))
    if name == "table" and parent == "embed":  # [vocab, d_model]: a row per token
        return (len(shape) - 1,)
    return None


def group_for(k: int, bits: int, group_size: int, name: str = "weight") -> int:
    """Contraction values per scale for a contraction length ``k`` (see the module doc)."""
    if bits == 8 or k <= group_size:
        return k
    best = max(d for d in range(1, group_size + 1) if k % d == 0)
    if 2 * best < group_size:
        raise UserError(f"{name}: contraction length {k} has no divisor between "
                        f"{group_size // 2} and {group_size}; choose a --group-size that "
                        f"divides it")
    return best


def quantize_array(w: Any, axes: tuple[int, ...], bits: int, group_size: int,
                   name: str = "weight") -> QTensor:
    """One float weight -> QTensor (host numpy math; exact and done once)."""
    if bits not in BITS:
        raise UserError(f"--bits must be 8 or 4, got {bits}")
    host = np.asarray(jax.device_get(w))
    dtype = str(jax.dtypes.canonicalize_dtype(host.dtype))
    w = host.astype(np.float32)
    k = math.prod(w.shape[axes[0]:axes[-1] + 1])
    spec = QuantSpec(bits, tuple(w.shape), dtype, tuple(axes),
                     group_for(k, bits, group_size, name))
    qmax = 127 if bits == 8 else 7
    grouped = w.reshape(spec.grouped_shape)
    amax = np.max(np.abs(grouped), axis=axes[0] + 1, keepdims=True)
    scales = (amax / qmax).astype(spec.scale_dtype)
    # A scale rounded down (to float16, or by the division) would push the largest value past
    # qmax, where it would clip: round it up by one step instead.
    low = scales.astype(np.float32) * qmax < amax
    scales = np.where(low, np.nextafter(scales, np.asarray(np.inf, scales.dtype)), scales)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)  # an all-zero group stays 0
    q = np.clip(np.rint(grouped / safe), -qmax, qmax).astype(np.int8).reshape(w.shape)
    values = q if bits == 8 else _pack_int4(q)
    return QTensor(jnp.asarray(values), jnp.asarray(scales), spec)


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> flat int8 bytes, two per byte (low nibble: the even index)."""
    flat = q.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] & 0x0F) | (flat[1::2] << 4)).astype(np.int8)


def _unpack_int4(packed: jnp.ndarray, n: int) -> jnp.ndarray:
    """flat packed int8 [ceil(n/2)] -> int8 [n]; arithmetic shifts sign-extend each nibble."""
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    high = jnp.right_shift(packed, 4)
    return jnp.stack([low, high], axis=-1).reshape(-1)[:n]


def dequantize_tensor(t: QTensor) -> jnp.ndarray:
    """QTensor -> the float weight (``spec.shape``, ``spec.dtype``); traceable (jit)."""
    s = t.spec
    q = t.values if s.bits == 8 else _unpack_int4(t.values, math.prod(s.shape))
    w = q.reshape(s.grouped_shape).astype(jnp.float32) * t.scales.astype(jnp.float32)
    return w.reshape(s.shape).astype(s.dtype)


def quantize_params(params: Any, bits: int, group_size: int = DEFAULT_GROUP_SIZE
                    ) -> QuantizedParams:
    """The parameters (a pure dict, looped layout) with every matmul weight a QTensor (INT8
    per output channel, or INT4 in groups of ``group_size`` along the contraction axis);
    everything else unchanged."""
    if bits not in BITS:
        raise UserError(f"--bits must be 8 or 4, got {bits}")
    if group_size < 1:
        raise UserError(f"--group-size must be at least 1, got {group_size}")

    def one(path: tuple, leaf: Any) -> Any:
        keys = tuple(_key(k) for k in path)
        axes = contraction_axes(keys, tuple(np.shape(leaf)))
        if axes is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return quantize_array(leaf, axes, bits, group_size, "/".join(keys))

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize(qparams: QuantizedParams) -> Any:
    """-> the float parameters the model takes (every QTensor dequantized); traceable, so it
    is the ``unpack`` of ``DecoderFamily``/``Seq2SeqFamily`` (run inside the jitted step)."""
    return jax.tree.map(lambda x: dequantize_tensor(x) if _is_q(x) else x, qparams,
                        is_leaf=_is_q)


def param_bytes(tree: Any) -> int:
    """Bytes of a parameter pytree's arrays (a QTensor: its int values and its scales)."""
    return sum(x.nbytes if _is_q(x) else int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree, is_leaf=_is_q))


def _paths(qparams: QuantizedParams) -> Iterator[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]
    for path, leaf in flat:
        yield "/".join(_key(k) for k in path), leaf


def describe(qparams: QuantizedParams) -> dict[str, Any]:
    """The ``quantization.json`` record of which weights are quantized and how."""
    quantized, kept = {}, []
    for name, leaf in _paths(qparams):
        if _is_q(leaf):
            quantized[name] = leaf.spec.to_json()
        else:
            kept.append(name)
    bits = {q["bits"] for q in quantized.values()}
    return {"format": FORMAT, "bits": bits.pop() if len(bits) == 1 else sorted(bits),
            "quantized": quantized, "float": kept}


def _storage(qparams: QuantizedParams) -> Any:
    """The checkpoint tree: each QTensor as {"values": int8, "scales": float}."""
    return jax.tree.map(lambda x: {"values": x.values, "scales": x.scales} if _is_q(x) else x,
                        qparams, is_leaf=_is_q)


# --------------------------------------------------------------------------------------------
# Run dirs


def is_quantized(run_dir: Path) -> bool:
    """Whether ``run_dir`` was written by ``jaxformer quantize``."""
    return (Path(run_dir) / QUANT_FILE).is_file()


def read_quantization(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / QUANT_FILE
    try:
        record = json.loads(path.read_text())
        specs = {name: QuantSpec.from_json(d) for name, d in record["quantized"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable quantization record ({e})") from e
    if record.get("format") != FORMAT:
        raise UserError(f"{path} has format {record.get('format')!r}; this jaxformer reads "
                        f"format {FORMAT}")
    return {**record, "specs": specs}


def quantize_run(run_dir: Path, out: Path, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 step: int | None = None) -> dict[str, Any]:
    """Writes a quantized copy of ``run_dir`` (its newest readable checkpoint, or ``step``) to
    ``out``: config, tokenizer files, ``quantization.json`` and a weights-only checkpoint at
    step 0. Nothing in ``run_dir`` changes; ``out`` must not exist or be empty.
    -> the quantization record (with ``bytes_float`` and ``bytes_quantized``)."""
    run_dir, out = Path(run_dir), Path(out)
    if is_quantized(run_dir):
        raise UserError(f"{run_dir} is already quantized ({QUANT_FILE}); quantize the float run "
                        "it came from")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose another --out")
    if bits not in BITS:
        raise UserError(f"--bits must be 8 or 4, got {bits}")
    cfg, params = load_run(run_dir, step)
    qparams = quantize_params(params, bits, group_size)  # every check before anything is written
    record = {**describe(qparams), "group_size": group_size if bits == 4 else None,
              "source": str(run_dir.absolute()), "source_step": step,
              "bytes_float": param_bytes(params), "bytes_quantized": param_bytes(qparams)}
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, cfg)
    if (run_dir / rundir.TOKENIZER_FILE).is_file():
        shutil.copyfile(run_dir / rundir.TOKENIZER_FILE, out / rundir.TOKENIZER_FILE)
    specials.copy_tokenizer_files(run_dir, out)
    ckpt = Checkpointer(out / rundir.CHECKPOINT_DIR, keep=1)
    try:
        ckpt.save_params(0, _storage(qparams), {"config": rundir.config_lib.to_dict(cfg),
                                                "quantized_from": str(run_dir.absolute())})
    finally:
        ckpt.close()
    # Written last: a run dir with quantization.json has its checkpoint.
    (out / QUANT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def load_quantized(run_dir: Path) -> tuple[Config, QuantizedParams, Callable[[Any], Any]]:
    """A quantized run dir -> (config, parameters with QTensor leaves, ``dequantize``): pass
    the last two as ``params``/``unpack`` to ``inference.restore.load_for_generation``."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    specs = read_quantization(run_dir)["specs"]

    def target(path: tuple, sds: jax.ShapeDtypeStruct) -> Any:
        spec = specs.get("/".join(_key(k) for k in path))
        if spec is None:
            return sds
        return {"values": jax.ShapeDtypeStruct(spec.values_shape, jnp.int8,
                                               sharding=sds.sharding),
                "scales": jax.ShapeDtypeStruct(spec.scale_shape, spec.scale_dtype,
                                               sharding=sds.sharding)}

    abstract = jax.tree_util.tree_map_with_path(target, abstract_params(cfg))
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep, create=False)
    try:
        stored = ckpt.restore_params(abstract)
    finally:
        ckpt.close()

    def rebuild(path: tuple, leaf: Any) -> Any:
        spec = specs.get("/".join(_key(k) for k in path))
        return leaf if spec is None else QTensor(leaf["values"], leaf["scales"], spec)

    is_stored_q = lambda x: isinstance(x, dict) and set(x) == {"values", "scales"}  # noqa: E731
    qparams = jax.tree_util.tree_map_with_path(rebuild, stored, is_leaf=is_stored_q)
    return cfg, qparams, dequantize


def quantize_command(run_dir: Path, out: Path, bits: int,
                     group_size: int = DEFAULT_GROUP_SIZE) -> str:
    """``jaxformer quantize``: writes the quantized run dir -> the one line to print."""
    r = quantize_run(run_dir, out, bits, group_size)
    scheme = ("INT8 per output channel" if bits == 8 else
              f"INT4 in groups of up to {group_size} (packed two per byte)")
    return (f"wrote {out}: {len(r['quantized'])} weights {scheme}; weights "
            f"{r['bytes_float'] / 2**20:.2f} MiB -> {r['bytes_quantized'] / 2**20:.2f} MiB "
            f"({r['bytes_float'] / r['bytes_quantized']:.2f}x smaller)")


# --------------------------------------------------------------------------------------------
# Measuring the change


def validation_loss(cfg: Config, params: Any, tokenizer_path: Path, *,
                    unpack: Callable[[Any], Any] | None = None, batches: int | None = None,
                    batch_size: int | None = None) -> dict[str, float]:
    """The validation loss and perplexity of ``params`` on the run's own validation rows, as
    training's evaluation computes them (``eval.batches`` batches of ``train.batch_size``,
    the unsmoothed nll per target token). ``unpack``: applied to ``params`` inside the jit
    (``dequantize`` for quantized parameters). -> {loss, perplexity, tokens}."""
    task = build_task(cfg, Path(tokenizer_path), lambda _line: None)
    forward = get_objective(cfg.objective.kind).logits
    graphdef, _ = abstract_model(cfg.model)
    unpack = unpack or (lambda p: p)

    @jax.jit
    def sums(p: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = forward(nnx.merge(graphdef, unpack(p)), batch)
        return cross_entropy_sums(logits, batch["targets"], batch["loss_weights"])

    nll = weight = 0.0
    n = batches if batches is not None else (cfg.eval.batches or None)
    for batch in task.val_batches(batch_size or cfg.train.batch_size, n):
        out = sums(params, batch)
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
    loss = nll / max(weight, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": weight}
