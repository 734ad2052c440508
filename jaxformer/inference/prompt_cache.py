"""Prompt caches on disk: the keys and values of a shared prompt prefix (a system prompt),
computed once and reused by later generations (``jaxformer sample --save-prompt-cache FILE``,
then ``--prompt-cache FILE``).

The file holds the prefix's token ids, the cache of every layer for all of them but the last
(the last is run again with the rest of the prompt, so that its logits start generation), and
a fingerprint of the parameters it was computed with: a cache from other weights is refused.
A continuation is tokenized on its own and appended to the prefix's ids (tokens do not merge
across the boundary, as they might when the whole text is tokenized at once).

Format: one ``.npz`` with ``tokens`` [P], ``fingerprint`` (a string), ``layout``
("heads_first") and ``layer{i}.{name}`` for each cache array of each layer, laid out as the
model's decode cache (``LayerCache`` k/v [1, K, P - 1, H]; MLA [1, P - 1, C]). Files written
before the cache went heads first have no ``layout`` and are refused with a line that says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily

SAMPLE_ELEMENTS = 4096  # elements of each parameter array that go into the fingerprint
LAYOUT = "heads_first"  # the decode cache's layout (nn.attention.LayerCache)


@dataclasses.dataclass
class PromptCache:
    tokens: list[int]  # the prefix's ids
    kv: list[dict[str, np.ndarray]]  # per layer, laid out as the model's cache (1 row)
    fingerprint: str


def fingerprint(params: Any) -> str:
    """A digest of the parameters' tree structure, shapes, dtypes and leading values (cheap
    for any size; two checkpoints of one run differ in their leading values)."""
    h = hashlib.sha256()
    leaves, tree = jax.tree_util.tree_flatten(params)
    h.update(str(tree).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a.reshape(-1)[:SAMPLE_ELEMENTS]).tobytes())
    return h.hexdigest()[:32]


def _check_family(family: Any) -> None:
    if not isinstance(family, DecoderFamily) or family.prefix_lm:
        raise UserError("prompt caches hold a causal decoder's keys and values: a prefix-LM "
                        "reads its whole prompt both ways and an encoder-decoder its source")
    family.require_slot_cache("a prompt cache")


def compute(family: DecoderFamily, params: Any, tokens: list[int]) -> PromptCache:
    """The cache of ``tokens`` (at least 2: the last is recomputed at use)."""
    _check_family(family)
    if len(tokens) < 2:
        raise UserError("a prompt cache needs a prompt of at least 2 tokens")
    if len(tokens) >= family.cfg.max_len:
        raise UserError(f"the prompt ({len(tokens)} tokens) fills the model's context "
                        f"(model.max_len {family.cfg.max_len})")
    n = len(tokens) - 1
    ids = jnp.asarray([tokens[:n]], jnp.int32)
    _, state, _ = jax.jit(family.prefill, static_argnums=(3,))(
        params, ids, jnp.asarray([n], jnp.int32), n)
    kv = [{k: np.asarray(v) for k, v in layer.items()} for layer in state["cache"]]
    return PromptCache(list(map(int, tokens)), kv, fingerprint(params))


def save(cache: PromptCache, path: Path) -> None:
    arrays = {f"layer{i}.{k}": v for i, layer in enumerate(cache.kv) for k, v in layer.items()}
    buf = io.BytesIO()  # written whole, then renamed: a failed write leaves no half file
    np.savez(buf, tokens=np.asarray(cache.tokens, np.int32),
             fingerprint=np.asarray(cache.fingerprint), layout=np.asarray(LAYOUT), **arrays)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load(path: Path, family: DecoderFamily, params: Any) -> PromptCache:
    """Reads a prompt cache and checks it belongs to these parameters."""
    _check_family(family)
    path = Path(path)
    try:
        with np.load(path) as f:
            tokens = f["tokens"].tolist()
            digest = str(f["fingerprint"])
            layout = str(f["layout"]) if "layout" in f.files else "slots_first"
            layers: dict[int, dict[str, np.ndarray]] = {}
            for name in f.files:
                if name.startswith("layer"):
                    index, key = name[len("layer"):].split(".", 1)
                    layers.setdefault(int(index), {})[key] = f[name]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the prompt cache {path}: {e}") from None
    if layout != LAYOUT:
        raise UserError(f"the prompt cache {path} was saved by an older jaxformer, whose cache "
                        "kept the slots before the heads; save it again")
    if digest != fingerprint(params):
        raise UserError(f"the prompt cache {path} was computed with other weights (another "
                        "run or checkpoint); save it again from this one")
    return PromptCache(tokens, [layers[i] for i in sorted(layers)], digest)
