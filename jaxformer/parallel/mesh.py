"""Device mesh construction from the config."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxformer.config import Config, MeshConfig
from jaxformer.errors import UserError

MESH_AXES = ("data",)


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with every device on the ``data`` axis.

    ``cfg.data == -1`` takes every device; a positive size takes the first ``cfg.data``.
    """
    devices = list(jax.devices() if devices is None else devices)
    size = len(devices) if cfg.data == -1 else cfg.data
    if size < 1 or size > len(devices):
        raise UserError(f"mesh.data={cfg.data} but {len(devices)} device(s) are available")
    return Mesh(np.asarray(devices[:size]).reshape(size), MESH_AXES)


def check_batch_layout(cfg: Config, n_data: int) -> None:
    """Each micro-batch must split evenly over the data axis."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n_data:
        raise UserError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch is "
                        f"not divisible by the {n_data} devices of the data axis")
