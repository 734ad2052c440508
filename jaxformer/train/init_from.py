"""``train.init_from``: start a new run from trained weights (a run dir or a Hugging Face dir).

Only the parameters are taken; the optimizer starts fresh at step 0, as fine-tuning should.
The architecture comes with them: ``model_from_source`` replaces the experiment's model keys
that shape or define the weights (``ARCHITECTURE_KEYS``) by the source's, except the keys the
user set on the command line, so a fine-tune needs no sizes retyped. A model that still does
not fit the weights is an error naming the keys to set and the source's values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import Config, ModelConfig
from jaxformer.errors import UserError
from jaxformer.hf import from_pretrained, pretrained_config
from jaxformer.hf.mapping import flatten, unflatten_like
from jaxformer.models.build import abstract_model, init_params
from jaxformer.models.layer_stack import stack_params
from jaxformer.parallel.sharding import Rules
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import param_layout
from jaxformer.runs.restore import load_run, read_run_config
from jaxformer.train.state import TrainState, state_shardings


def is_hf_dir(path: Path) -> bool:
    """A transformers ``save_pretrained`` directory (its config.json names a model_type)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


# ModelConfig fields that are the experiment's choice whatever the weights: regularization,
# kernels, numerics, memory, initialization of new parameters, the classification head, how
# experts are batched and penalized, when random features are redrawn, and which parameters
# train (a captioner fine-tuned with its tower frozen). Every other field
# shapes the parameters or defines what they compute (sizes, positions, norms, activation,
# attention and expert layout), so it is part of the architecture a fine-tune takes from its
# source (a new field too, by default).
EXPERIMENT_MODEL_KEYS = frozenset({
    "dropout", "attention_dropout", "attention", "param_dtype", "compute_dtype", "init_std",
    "scan_layers", "remat", "num_labels", "token_labels", "capacity_factor", "moe_group_size",
    "router_aux_loss", "router_z_loss", "feature_redraw", "ff_chunks", "freeze_vision"})
ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                          if f.name not in EXPERIMENT_MODEL_KEYS)


def source_model(source: str | Path) -> ModelConfig:
    """The model config saved with ``source``: a run dir's config.json, or what
    ``jaxformer.hf.from_pretrained`` makes of a Hugging Face directory's."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"train.init_from: {source} is not a directory")
    return pretrained_config(source) if is_hf_dir(source) else read_run_config(source).model


def model_from_source(cfg: Config, explicit_keys: Iterable[str] = (),
                      run_dir: Path | str | None = None) -> tuple[Config, str]:
    """``cfg`` with the architecture of ``cfg.train.init_from`` -> (the config, a note).

    Every ``ARCHITECTURE_KEYS`` value of the model section is the source's, except the dotted
    keys in ``explicit_keys`` (those the user set with ``--set model.X=...``), which keep
    ``cfg``'s value. The note lists the values taken that differ from ``cfg``'s ("" when none
    do, or without ``init_from``). When the source is gone, a resumed run (``run_dir`` holds
    its saved config) takes the architecture it recorded at its start. A config the source's
    values make invalid (``data.seq_len`` above the source's ``max_len``) is a UserError.
    """
    if not cfg.train.init_from:
        return cfg, ""
    source = Path(cfg.train.init_from)
    saved = rundir.read_config(Path(run_dir)) if run_dir is not None else None
    their = saved.model if not source.is_dir() and saved is not None else source_model(source)
    explicit = set(explicit_keys)
    taken = {k: getattr(their, k) for k in ARCHITECTURE_KEYS if f"model.{k}" not in explicit}
    changed = [f"{k} {getattr(cfg.model, k)!r} -> {v!r}" for k, v in taken.items()
               if getattr(cfg.model, k) != v]
    new = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **taken))
    try:
        new = config_lib.validate(new)
    except UserError as e:
        raise UserError(f"train.init_from: with the architecture of {source}: {e}") from None
    if not changed:
        return new, ""
    return new, (f"model from {source}: {', '.join(changed)} (--set model.KEY=... keeps a value "
                 "of the experiment)")


def explicit_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys of ``KEY=VALUE`` command-line overrides (``model.d_model=64``)."""
    return {item.split("=", 1)[0].strip() for item in overrides}


def _fit_hint(source: Path, model_cfg: ModelConfig) -> str:
    """"; set model.d_model=64 model.n_layers=2 ...": the architecture keys whose values differ
    from the source's (empty when they match, or the source's config is unreadable)."""
    try:
        their = source_model(source)
    except UserError:
        return ""
    differ = [f"model.{k}={_arg(getattr(their, k))}" for k in ARCHITECTURE_KEYS
              if getattr(their, k) != getattr(model_cfg, k)]
    if not differ:
        return ""
    return (f"; the source has {' '.join(differ)}: set these (or leave them unset to take the "
            "source's architecture)")


def _arg(value: object) -> str:
    """A value as ``--set`` takes it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_params(source: str | Path, model_cfg: ModelConfig, seed: int = 0,
                step: int | None = None, no_new_because: str = ""
                ) -> tuple[dict[str, Any], str]:
    """The parameters in ``source`` for a model of ``model_cfg`` -> (params, a note).

    Every parameter the model shares with the source must have the source's shape (a mismatch
    is an error naming it). Parameters the source lacks, such as a classification head on top
    of a masked-LM checkpoint, start from the usual init with ``seed`` -- unless
    ``no_new_because`` gives the reason they may not (LoRA: they would never train), which
    makes them an error; source parameters the model lacks (that masked-LM head) are left out.
    The note names both groups.
    """
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"train.init_from: {source} is not a directory")
    if is_hf_dir(source):
        params = from_pretrained(source).params
    else:
        _, params = load_run(source, step)  # step: a run dir's (default: its newest)
    scan = model_cfg.scan_layers  # compare in the looped layout, stack at the end
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    template = nnx.to_pure_dict(abstract_model(model_cfg)[1])
    expected, found = param_layout(template), param_layout(params)
    shared = sorted(set(expected) & set(found))
    for name in shared:
        if expected[name] != found[name]:
            raise UserError(f"train.init_from: {source} does not fit the model: parameter "
                            f"{name} expected shape {expected[name]}, found {found[name]}"
                            f"{_fit_hint(source, model_cfg)}")
    if not shared:
        raise UserError(f"train.init_from: {source} shares no parameter with the model"
                        f"{_fit_hint(source, model_cfg)}")
    new = sorted(set(expected) - set(found))
    unused = sorted(set(found) - set(expected))
    # Whole modules may be new (a classifier) or left out (a masked-LM head); a module both
    # sides have must match parameter for parameter (another layer count is not a fine-tune).
    both = {n.split("/", 1)[0] for n in expected} & {n.split("/", 1)[0] for n in found}
    for name in new + unused:
        if name.split("/", 1)[0] in both:
            where = "the source lacks" if name in expected else "the model lacks"
            raise UserError(f"train.init_from: {source} does not fit the model: parameter "
                            f"{name} ({where} it){_fit_hint(source, model_cfg)}")
    if new and no_new_because:
        raise UserError(f"train.init_from: {source} lacks parameters of the model (new "
                        f"(initialized): {_groups(new)}); {no_new_because}")
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
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)
