"""PNG figures with matplotlib: metric curves of runs, and a config's learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxformer.analysis.events import read_scalars
from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.train.optimizer import learning_rate_schedule, warmup_steps


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: Sequence[Path], metric: str, out: Path, *, log_y: bool = False) -> None:
    """One curve of ``metric`` (a TensorBoard tag such as ``eval/loss``) per run dir."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir in run_dirs:
        scalars = read_scalars(run_dir)
        if metric not in scalars:
            raise UserError(f"{run_dir} has no scalar {metric!r}; it has: "
                            f"{', '.join(sorted(scalars))}")
        steps, values = zip(*scalars[metric], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None,
                label=Path(run_dir).name)
    ax.set(xlabel="step", ylabel=metric, yscale="log" if log_y else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out, plt)


def plot_schedule(cfg: Config, out: Path) -> np.ndarray:
    """The learning rate of every step of ``cfg`` -> the values plotted, [train.steps]."""
    import jax
    import jax.numpy as jnp

    schedule = learning_rate_schedule(cfg.train, cfg.model.d_model)
    steps = np.arange(cfg.train.steps)
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(cfg.train.steps)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, lrs)
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"{cfg.name}: {cfg.train.schedule}, warmup {warmup_steps(cfg.train)} steps")
    ax.grid(alpha=0.3)
    _save(fig, out, plt)
    return lrs


def _save(fig, out: Path, plt) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
