"""Device mesh construction from the config.

The mesh always has the five axes ``data``, ``fsdp``, ``expert``, ``sequence``, ``tensor``
(unused ones have size 1), in that order: the axes the batch is split over come first, so on
several hosts each process's devices hold one contiguous block of batch rows, and ``tensor``
comes last, so a tensor-parallel group sits on neighbouring devices (one host, fastest links).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxformer.config import Config, MeshConfig
from jaxformer.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Axis sizes each preset uses for the axes the config leaves at 0 (-1: the remaining devices).
PRESET_SIZES: dict[str, dict[str, int]] = {
    "data": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tensor": {"fsdp": -1, "tensor": 2},
    "sequence": {"sequence": -1},
    "expert": {"expert": -1},
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """{axis: size} for ``n_devices``; sizes the config leaves at 0 come from the preset."""
    preset = PRESET_SIZES[cfg.preset]
    sizes = {}
    for axis in MESH_AXES:
        size = getattr(cfg, axis)
        sizes[axis] = size if size != 0 else preset.get(axis, 1)
    if sum(s == -1 for s in sizes.values()) > 1:  # the preset's fill plus one set by the user
        fill = next(a for a in MESH_AXES if preset.get(a) == -1)
        sizes[fill] = 1
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fixed < 1 or n_devices % fixed:
        raise UserError(f"mesh {_describe(sizes)} does not fit {n_devices} device(s)")
    for axis, size in sizes.items():
        if size == -1:
            sizes[axis] = n_devices // fixed
    if math.prod(sizes.values()) > n_devices:
        raise UserError(f"mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices but "
                        f"{n_devices} are available")
    return sizes


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "1 device"


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all, across every process) shaped by ``cfg``.

    A mesh smaller than the device count takes the first devices. Devices are ordered by
    (process, id), so the leading (batch) axes split across processes.
    """
    devices = sorted(jax.devices() if devices is None else devices,
                     key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(cfg, len(devices))
    n = math.prod(sizes.values())
    grid = np.asarray(devices[:n], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, MESH_AXES)


def batch_axes_size(mesh: Mesh, batch_axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes)


def check_batch_layout(cfg: Config, n_batch_shards: int) -> None:
    """Each micro-batch must split evenly over the mesh axes that hold batch rows."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n_batch_shards:
        raise UserError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch is "
                        f"not divisible by the {n_batch_shards} batch shards of the mesh")
