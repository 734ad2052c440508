"""Name-and-layout rules between jaxformer parameter paths and Hugging Face tensor names.

A family (GPT-2, Llama, ...) lists one ``Rule`` per tensor: our path (``"blocks/0/attn/w_q"``),
the transformers name, and the two layout functions between them. A rule may also join several
of our parameters into one of their tensors (GPT-2's fused ``c_attn`` holds our ``w_q``, ``w_k``
and ``w_v``): then ``ours`` is a tuple, ``to_ours`` returns a tuple and ``to_theirs`` takes
one. Import and export are then generic, and so are their errors: a missing tensor or a shape
mismatch names the tensor with the expected and the found shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxformer.hf.checkpoint_io import HFConversionError

Layout = Callable[[np.ndarray], np.ndarray]


def same(x: np.ndarray) -> np.ndarray:
    return x


# torch ``nn.Linear`` stores [out, in]; ours are [in, out] with head axes split out. These are
# the layouts between them (to_ours transposes; the generic import then reshapes).
def transpose(x: np.ndarray) -> np.ndarray:
    """Their [out, in] -> [in, out]."""
    return np.asarray(x).T


def in_major(x: np.ndarray) -> np.ndarray:
    """Our [in, *out] (e.g. w_q [D, N, H]) -> their [prod(out), in]."""
    return x.reshape(x.shape[0], -1).T


def out_major(x: np.ndarray) -> np.ndarray:
    """Our [*in, out] (e.g. w_out [N, H, D]) -> their [out, prod(in)]."""
    return x.reshape(-1, x.shape[-1]).T


def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str | tuple[str, ...]  # "/"-joined path(s) in the pure parameter dict
    theirs: str  # transformers state_dict name
    to_ours: Callable[..., Any] = same  # their array -> our array (or tuple; reshaped after)
    to_theirs: Callable[..., np.ndarray] = same  # our array(s) -> their array

    @property
    def paths(self) -> tuple[str, ...]:
        return self.ours if isinstance(self.ours, tuple) else (self.ours,)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Pure nested dict -> {"a/b/c": array}."""
    flat: dict[str, np.ndarray] = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_like(template: dict[str, Any], flat: dict[str, np.ndarray],
                   prefix: str = "") -> dict[str, Any]:
    """{"a/b/c": array} -> a nested dict with the keys (and key types) of ``template``."""
    out: dict[Any, Any] = {}
    for key, value in template.items():
        path = f"{prefix}{key}"
        out[key] = (unflatten_like(value, flat, path + "/") if isinstance(value, dict)
                    else flat[path])
    return out


def import_tensors(rules: list[Rule], tensors: dict[str, np.ndarray],
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Their tensors -> our flat params, checking that every parameter is covered and fits."""
    covered = {p for r in rules for p in r.paths}
    uncovered = sorted(set(shapes) - covered)
    if uncovered:
        raise HFConversionError(f"no conversion rule for jaxformer parameter {uncovered[0]}")
    flat = {}
    for r in rules:
        if r.theirs not in tensors:
            raise HFConversionError(f"missing tensor {r.theirs} (for {', '.join(r.paths)})")
        zeros = [np.zeros(shapes[p], np.float32) for p in r.paths]
        expected = tuple(r.to_theirs(*zeros).shape)
        found = tuple(tensors[r.theirs].shape)
        if found != expected:
            raise HFConversionError(f"tensor {r.theirs}: expected shape {list(expected)}, "
                                    f"found {list(found)}")
        ours = r.to_ours(np.asarray(tensors[r.theirs], np.float32))
        ours = ours if isinstance(r.ours, tuple) else (ours,)
        for path, value in zip(r.paths, ours, strict=True):
            flat[path] = np.asarray(value, np.float32).reshape(shapes[path])
    return flat


def export_tensors(rules: list[Rule], flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> their tensors."""
    return {r.theirs: np.asarray(r.to_theirs(*[np.asarray(flat[p], np.float32) for p in r.paths]),
                                 np.float32)
            for r in rules}


def dense_rules(ours: str, theirs: str) -> list[Rule]:
    """A jaxformer Dense (w [in, out], b) <-> a torch Linear (weight [out, in], bias)."""
    return [Rule(ours + "/w", theirs + ".weight", to_ours=transpose, to_theirs=transpose),
            Rule(ours + "/b", theirs + ".bias")]


def layernorm_rules(ours: str, theirs: str) -> list[Rule]:
    """A jaxformer LayerNorm (scale, bias) <-> a torch LayerNorm (weight, bias)."""
    return [Rule(ours + "/scale", theirs + ".weight"), Rule(ours + "/bias", theirs + ".bias")]
