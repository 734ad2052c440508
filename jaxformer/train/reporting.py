"""Where training metrics go: TensorBoard event files (tensorboardX) and the console."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import tensorboardX


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

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def line(self, text: str) -> None:
        self.echo(text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
