"""Where training metrics go: TensorBoard event files (tensorboardX) and the console."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorboardX
import tensorboardX.summary

from jaxformer.config import Config, to_dict


class Reporter:
    """Writes scalars to ``run_dir`` for ``tensorboard --logdir runs`` and prints a line."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None], enabled: bool = True):
        self.echo = echo
        # The file name has a one-second timestamp; a resume within the same second would
        # overwrite the earlier file, so a nanosecond suffix keeps each writer's file apart (and
        # the names in creation order).
        suffix = f".{time.time_ns():020d}"
        self.writer = (tensorboardX.SummaryWriter(str(run_dir), filename_suffix=suffix)
                       if enabled else None)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def expert_load(self, step: int, load: Sequence[float]) -> None:
        """The share of routed tokens per expert as a TensorBoard histogram (one bar per
        expert: bucket e holds expert e's share; a balanced router gives a flat profile)."""
        if self.writer is None:
            return
        idx = np.arange(len(load), dtype=np.float64)
        load = np.asarray(load, np.float64)
        self.writer.add_histogram_raw(
            "train/moe_expert_load", min=0.0, max=float(len(load) - 1), num=float(load.sum()),
            sum=float((idx * load).sum()), sum_squares=float((idx ** 2 * load).sum()),
            bucket_limits=(idx + 0.5).tolist(), bucket_counts=load.tolist(), global_step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, float | int | str | bool],
                metrics: dict[str, float]) -> None:
        """Writes TensorBoard's hparams-plugin records into this run's own event file.

        ``metrics`` maps scalar tags the run already logs (``eval/loss``...) to their final
        values; the HPARAMS tab shows each tag's last logged value next to the hparams.
        """
        if self.writer is None:
            return
        for summary in tensorboardX.summary.hparams(hparams, metrics):
            self.writer.file_writer.add_summary(summary)

    def final_hparams(self, cfg: Config, eval_metrics: dict[int, dict[str, float]],
                      losses: dict[int, float]) -> None:
        """``hparams`` of the config with the last eval metrics and train loss of the run
        (nothing when this invocation trained nothing: the earlier event file has them)."""
        if not eval_metrics and not losses:
            return
        self.hparams(flat_hparams(cfg), final_metrics(eval_metrics, losses))

    def line(self, text: str) -> None:
        self.echo(text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# Scalar tags the hparams view compares runs by (the eval ones only where the run evaluated).
HPARAM_METRICS = ("eval/loss", "eval/accuracy", "eval/perplexity", "train/loss")


def flat_hparams(cfg: Config) -> dict[str, float | int | str | bool]:
    """Every scalar config leaf under its dotted key (``train.lr``); tuples become strings."""
    def walk(value: object, prefix: str) -> dict[str, float | int | str | bool]:
        if isinstance(value, dict):
            out: dict[str, float | int | str | bool] = {}
            for k, v in value.items():
                out.update(walk(v, f"{prefix}{k}."))
            return out
        key = prefix[:-1]
        if isinstance(value, bool | int | float | str):
            return {key: value}
        return {key: str(tuple(value) if isinstance(value, list) else value)}

    return walk(to_dict(cfg), "")


def final_metrics(eval_metrics: dict[int, dict[str, float]],
                  losses: dict[int, float]) -> dict[str, float]:
    """{tag: final value} of ``HPARAM_METRICS``: the last eval's metrics and train loss."""
    values: dict[str, float] = {}
    if eval_metrics:
        last = eval_metrics[max(eval_metrics)]
        values.update({f"eval/{k}": float(last[k]) for k in ("loss", "accuracy", "perplexity")
                       if k in last})
    if losses:
        values["train/loss"] = float(losses[max(losses)])
    return {tag: values[tag] for tag in HPARAM_METRICS if tag in values}


def format_metrics(values: dict[str, float]) -> str:
    parts = []
    for name, value in values.items():
        if name in ("tokens_per_sec",):
            parts.append(f"{name} {value:,.0f}")
        elif name in ("lr",):
            parts.append(f"{name} {value:.2e}")
        elif name in ("mfu",):
            parts.append(f"{name} {100 * value:.1f}%")
        else:
            parts.append(f"{name} {value:.4g}")
    return " | ".join(parts)
