"""``train.init_from``: start a new run from trained weights (a run dir or a Hugging Face dir).

Only the parameters are taken; the optimizer starts fresh at step 0, as fine-tuning should.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import optax

from jaxformer.config import ModelConfig
from jaxformer.errors import UserError
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


def load_params(source: str | Path, model_cfg: ModelConfig) -> dict[str, Any]:
    """The parameters in ``source``, checked against the shapes ``model_cfg`` needs."""
    from flax import nnx

    source = Path(source)
    if not source.is_dir():
        raise UserError(f"train.init_from: {source} is not a directory")
    if is_hf_dir(source):
        from jaxformer.hf import from_pretrained

        params = from_pretrained(source).params
    else:
        from jaxformer.inference.restore import load_run

        _, params = load_run(source)
    expected = param_layout(nnx.to_pure_dict(abstract_model(model_cfg)[1]))
    found = param_layout(params)
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise UserError(f"train.init_from: {source} does not fit the model: parameter "
                            f"{name} expected shape {expected.get(name)}, found "
                            f"{found.get(name)}")
    return params


def state_from_params(params: dict[str, Any], model_cfg: ModelConfig,
                      tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """A step-0 TrainState holding ``params``, placed in the trainer's shardings."""
    import jax.numpy as jnp

    shardings = state_shardings(model_cfg, tx, mesh)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)
