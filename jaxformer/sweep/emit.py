"""Scripts that run a sweep on a cluster instead of this machine.

``--emit slurm`` writes ``sweep.slurm``: a job array with one task per point, each running
``jaxformer train`` under ``srun`` (``jax.distributed`` reads the SLURM environment, so a task
may span nodes). ``--emit tpu`` writes ``sweep_tpu.sh``: the points one after another on a TPU
VM, each on all its workers through ``gcloud compute tpus tpu-vm ssh --worker=all``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from jaxformer.sweep.runner import LOG_FILE, train_command
from jaxformer.sweep.space import Sweep

SLURM_FILE = "sweep.slurm"
TPU_FILE = "sweep_tpu.sh"


def _portable(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _point_commands(sweep: Sweep, sweep_dir: Path) -> list[tuple[str, str, str]]:
    """(point name, run dir, shell-quoted train command) of every point."""
    out = []
    for point in sweep.points:
        run_dir = os.path.join(_portable(sweep_dir), point.name)
        cmd = train_command(sweep, point, run_dir, ["jaxformer"])
        cmd[2] = _portable(sweep.experiment)
        out.append((point.name, run_dir, shlex.join(cmd)))
    return out


def slurm_script(sweep: Sweep, sweep_dir: Path) -> str:
    """A SLURM job array script: task i trains point i."""
    n = len(sweep.points)
    name = f"{sweep.base.name}_sweep"
    lines = [
        "#!/bin/bash",
        f"# {n} points of {_portable(sweep.experiment)}; submit with: sbatch "
        f"{shlex.quote(os.path.join(_portable(sweep_dir), SLURM_FILE))}",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{n - 1}",
        f"#SBATCH --output={_portable(sweep_dir)}/slurm-%A_%a.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "# Add your cluster's resources here, e.g. #SBATCH --gpus-per-node=1 --time=04:00:00",
        "# Each point is one srun step: with --nodes=N (one task per node) it is an N-host job;",
        "# jaxformer train joins its processes through jax.distributed from the SLURM",
        "# environment (docs/scaling.md), and --set mesh.* shapes the mesh over all of them.",
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        "# Activate the environment jaxformer is installed in here, e.g.",
        "# source .venv/bin/activate",
        "",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, (point, run_dir, cmd) in enumerate(_point_commands(sweep, sweep_dir)):
        log = shlex.quote(os.path.join(run_dir, LOG_FILE))
        lines += [
            f"  {i})  # {point}",
            f"    mkdir -p {shlex.quote(run_dir)}",
            f"    srun {cmd} 2>&1 | tee -a {log}",
            "    ;;",
        ]
    lines += [
        '  *) echo "no sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
        "",
    ]
    return "\n".join(lines)


def tpu_script(sweep: Sweep, sweep_dir: Path) -> str:
    """A script running the points one after another on every worker of a TPU VM."""
    lines = [
        "#!/bin/bash",
        f"# {len(sweep.points)} points of {_portable(sweep.experiment)}, one after another, on "
        "all workers of a TPU VM.",
        "# The repository must be at $REMOTE_DIR on every worker (default ~/jaxformer, with",
        "# jaxformer installed), and the sweep dir on storage all workers share.",
        "#   TPU_NAME=my-tpu TPU_ZONE=us-central2-b bash "
        + os.path.join(_portable(sweep_dir), TPU_FILE),
        "set -euo pipefail",
        ': "${TPU_NAME:?set TPU_NAME to the name of your TPU VM}"',
        'REMOTE_DIR="${REMOTE_DIR:-~/jaxformer}"',
        "ZONE=()",
        'if [ -n "${TPU_ZONE:-}" ]; then ZONE=(--zone "$TPU_ZONE"); fi',
        "",
        "run_point() {",
        '  gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${ZONE[@]+"${ZONE[@]}"} --worker=all \\',
        '    --command "cd $REMOTE_DIR && $1"',
        "}",
        "",
    ]
    for i, (point, _, cmd) in enumerate(_point_commands(sweep, sweep_dir)):
        lines += [f"# point {i}: {point}", f"run_point {shlex.quote(cmd)}", ""]
    return "\n".join(lines)


def emit(sweep: Sweep, sweep_dir: Path, kind: str) -> Path:
    """Writes the ``kind`` ("slurm" or "tpu") script into ``sweep_dir``; returns its path."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if kind == "slurm":
        path, text = sweep_dir / SLURM_FILE, slurm_script(sweep, sweep_dir)
    elif kind == "tpu":
        path, text = sweep_dir / TPU_FILE, tpu_script(sweep, sweep_dir)
    else:
        raise ValueError(f"unknown emit kind {kind!r}")
    path.write_text(text)
    path.chmod(0o755)
    return path
