"""TPU chips and topologies: data-sheet numbers, and the devices of a topology that XLA can
compile for on a machine without one (``jax.experimental.topologies`` with libtpu installed:
``pip install "jax[tpu]"``, or ``pip install -e ".[tpu]"``).

Numbers per chip from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e): dense bf16 peak, HBM capacity and bandwidth, and the interconnect (ICI)
bandwidth a collective can use, taken as half the bidirectional ICI bandwidth per chip (v5e:
400 GB/s bidirectional -> 200 GB/s, which is also its "all-reduce bandwidth per pod" of
51.2 TB/s over 256 chips; v4: 1.1 PB/s over 4,096 chips). Across slices (multi-slice) traffic
goes over the data-center network (DCN), far slower: its per-chip share is listed too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from jax.experimental import topologies

from jaxformer.errors import UserError

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the topology prefix: "v5e"
    peak_bf16: float  # FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s one collective can use per chip (see the module docstring)
    dcn_bandwidth: float  # bytes/s per chip between slices


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 1.1e15 / 4096, 25e9 / 8),
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 200e9, 2 * 100e9 / 8 / 8),
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 600e9, 50e9 / 8),
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1638e9, 400e9, 2 * 100e9 / 8 / 8),
}

INSTALL_HINT = ('the TPU compiler (libtpu) is not installed; install it with '
                'pip install "jax[tpu]" (or pip install -e ".[tpu]" in a checkout)')


def chip_for(topology: str) -> Chip:
    """The chip of a topology name such as "v5e:16x16" or "v5p:4x4x8"."""
    prefix = topology.split(":")[0].strip().lower()
    if prefix not in CHIPS or ":" not in topology:
        raise UserError(f"unknown topology {topology!r}: give CHIP:SHAPE with CHIP one of "
                        f"{', '.join(CHIPS)}, e.g. v5e:16x16 or v5p:4x4x8")
    return CHIPS[prefix]


def topology_chips(topology: str) -> int:
    """Chips in one slice of ``topology``: the product of its shape ("v5p:4x4x8" -> 128)."""
    chip_for(topology)
    shape = topology.split(":", 1)[1]
    try:
        dims = [int(d) for d in shape.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise UserError(f"topology {topology!r}: the shape after ':' must be sizes joined by "
                        "'x', e.g. 4x4 or 4x4x8")
    return math.prod(dims)


def topology_devices(topology: str, slices: int = 1) -> list[Any]:
    """The devices of ``slices`` slices of ``topology``, for compiling only (no chip needed).
    A missing libtpu is a UserError that says how to install it."""
    chip_for(topology)
    topology_chips(topology)
    if slices < 1:
        raise UserError(f"--slices must be at least 1, got {slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(INSTALL_HINT)
    # Several compiles at once (a sweep in two shells, the tests) may share the library; and
    # with no TPU VM around there is no metadata server to ask.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        with _quiet_stderr():  # libtpu's start-up complaints about the missing TPU VM
            desc = topologies.get_topology_desc(topology, "tpu", num_slices=slices)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"topology {topology!r} with {slices} slice(s): {first}") from None
    return list(desc.devices)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file while the TPU library starts: it writes its
    complaints about not running on a TPU VM there from C++, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
