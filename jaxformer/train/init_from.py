"""``train.init_from``: start a new run from trained weights (a run dir or a Hugging Face dir).

Only the parameters are taken; the optimizer starts fresh at step 0, as fine-tuning should.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import optax

from jaxformer.config import ModelConfig
from jaxformer.errors import UserError
from jaxformer.models.layer_stack import stack_params
from jaxformer.parallel.sharding import Rules
from jaxformer.train.checkpoint import param_layout
from jaxformer.train.state import TrainState, abstract_model, state_shardings


def is_hf_dir(path: Path) -> bool:
    """A transformers ``save_pretrained`` directory (its config.json names a model_type)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def load_params(source: str | Path, model_cfg: ModelConfig, seed: int = 0
                ) -> tuple[dict[str, Any], str]:
    """The parameters in ``source`` for a model of ``model_cfg`` -> (params, a note).

    Every parameter the model shares with the source must have the source's shape (a mismatch
    is an error naming it). Parameters the source lacks, such as a classification head on top
    of a masked-LM checkpoint, start from the usual init with ``seed``; source parameters the
    model lacks (that masked-LM head) are left out. The note names both groups.
    """
    from flax import nnx

    from jaxformer.hf.mapping import flatten, unflatten_like
    from jaxformer.train.state import init_params

    source = Path(source)
    if not source.is_dir():
        raise UserError(f"train.init_from: {source} is not a directory")
    if is_hf_dir(source):
        from jaxformer.hf import from_pretrained

        params = from_pretrained(source).params
    else:
        from jaxformer.inference.restore import load_run

        _, params = load_run(source)
    scan = model_cfg.scan_layers  # compare in the looped layout, stack at the end
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    template = nnx.to_pure_dict(abstract_model(model_cfg)[1])
    expected, found = param_layout(template), param_layout(params)
    shared = sorted(set(expected) & set(found))
    for name in shared:
        if expected[name] != found[name]:
            raise UserError(f"train.init_from: {source} does not fit the model: parameter "
                            f"{name} expected shape {expected[name]}, found {found[name]}")
    if not shared:
        raise UserError(f"train.init_from: {source} shares no parameter with the model")
    new = sorted(set(expected) - set(found))
    unused = sorted(set(found) - set(expected))
    # Whole modules may be new (a classifier) or left out (a masked-LM head); a module both
    # sides have must match parameter for parameter (another layer count is not a fine-tune).
    both = {n.split("/", 1)[0] for n in expected} & {n.split("/", 1)[0] for n in found}
    for name in new + unused:
        if name.split("/", 1)[0] in both:
            where = "the source lacks" if name in expected else "the model lacks"
            raise UserError(f"train.init_from: {source} does not fit the model: parameter "
                            f"{name} ({where} it)")
    flat = flatten(params)
    if new:
        fresh = flatten(init_params(model_cfg, seed))
        flat = {**{k: fresh[k] for k in new}, **flat}
    note = f"{len(shared)} tensors"
    if new:
        note += f"; new (initialized): {_groups(new)}"
    if unused:
        note += f"; not used: {_groups(unused)}"
    params = unflatten_like(template, flat)
    return (stack_params(params) if scan else params), note


def _groups(names: list[str]) -> str:
    """Parameter paths summarized by their top-level module ("mlm/norm/scale" -> "mlm")."""
    return ", ".join(sorted({n.split("/", 1)[0] for n in names}))


def state_from_params(params: dict[str, Any], model_cfg: ModelConfig,
                      tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                      rules: Rules | None = None) -> TrainState:
    """A step-0 TrainState holding ``params``, placed in the trainer's shardings."""
    import jax.numpy as jnp

    shardings = state_shardings(model_cfg, tx, mesh, rules)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)
