"""Multi-host start-up through JAX's own multi-controller runtime (``jax.distributed``).

One Python process per host (or per group of devices) runs the same program; after
``jax.distributed.initialize`` every process sees all devices of the job in ``jax.devices()``
and the jitted step runs as one SPMD program over the global mesh. Nothing here moves data:
XLA's collectives (NCCL on GPUs, ICI/DCN on TPUs, gloo between CPU processes) do.

How the processes find each other, in order:

1. ``--coordinator HOST:PORT --num-processes N --process-id I`` on the command line (any
   launcher, and ``scripts/launch_local.py``);
2. a SLURM job with more than one task (``srun``): JAX reads the coordinator, process count
   and id from the SLURM environment;
3. a multi-host Cloud TPU slice: JAX reads them from the TPU metadata;
4. otherwise a single process.
"""

from __future__ import annotations

import os

import jax

from jaxformer.errors import UserError


def cluster_detected(environ: dict[str, str] | None = None) -> str | None:
    """The cluster kind whose environment asks for several processes, or None."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the job's processes (see the module docstring). Must run before anything
    touches a JAX backend. -> whether this is a multi-process run."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if None in explicit:
            raise UserError("multi-process training needs all of --coordinator HOST:PORT, "
                            "--num-processes N and --process-id I")
        if not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise UserError(f"--process-id {process_id} must be in [0, {num_processes})")
        if num_processes == 1:
            return False
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if cluster_detected() is None:
        return False
    _cpu_collectives()
    jax.distributed.initialize()  # JAX's cluster detection fills in the rest
    return True


def _cpu_collectives() -> None:
    """CPU processes reduce across each other with gloo (GPU/TPU backends ignore this)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
