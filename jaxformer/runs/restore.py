"""Opening a run dir: its config and the weights of its latest (or a chosen) checkpoint.

Sampling, export, ``train.init_from`` and attention maps all start here. Only the parameters
are read (no optimizer state), onto one device, in the looped layout (blocks as a list).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models import lora
from jaxformer.models.build import abstract_model, looped
from jaxformer.runs import lora as lora_run
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_run_config(run_dir: Path) -> Config:
    """The config of the run in ``run_dir``; a UserError when it is not a run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory (expected a jaxformer run dir)")
    cfg = rundir.read_config(run_dir)
    if cfg is None:
        raise UserError(f"{run_dir} is not a jaxformer run dir (no {rundir.CONFIG_FILE})")
    return cfg


def load_run(run_dir: Path, step: int | None = None, *,
             warn: Callable[[str], None] = _to_stderr) -> tuple[Config, dict[str, Any]]:
    """-> (the run's config, the parameters of its newest readable checkpoint or of
    ``step``), with the blocks as a list (a run trained with scanned layers comes back with
    scan_layers off). An unreadable newest checkpoint is skipped with a ``warn`` line. A LoRA
    run's adapters come back merged into its base's weights (with ``lora.rank`` 0 in the
    config: ``jaxformer.runs.lora``)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    directory = run_dir / rundir.CHECKPOINT_DIR
    if not Checkpointer.exists(directory):
        raise UserError(f"{run_dir} has no checkpoint yet")
    ckpt = Checkpointer(directory, cfg.checkpoint.keep, create=False)
    try:
        if step is not None and step not in ckpt.steps():
            raise UserError(f"{run_dir} has no checkpoint at step {step} (have {ckpt.steps()})")
        params = ckpt.restore_params(abstract_params(cfg), step, warn=warn)
    finally:
        ckpt.close()
    if cfg.lora.rank:  # the checkpoint holds adapters: fold them into the base's weights
        params = lora_run.merged_params(cfg, run_dir, params, load_run)
        # What is returned are plain weights now: a config that says so (a quantized or
        # exported copy must not look for adapters).
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    model_cfg, _, params = looped(cfg.model, params)
    return dataclasses.replace(cfg, model=model_cfg), params


def abstract_params(cfg: Config) -> dict[str, Any]:
    """The shapes of what the run's checkpoints hold as ShapeDtypeStructs on the first local
    device: its parameters, or a LoRA run's adapters."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = nnx.to_pure_dict(abstract_model(cfg.model)[1])
    if cfg.lora.rank:  # a LoRA run's checkpoints: the adapters of the targeted kernels
        template = lora.adapter_shapes(template, cfg.lora)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        template)
