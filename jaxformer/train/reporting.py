"""Where training metrics go: TensorBoard event files (tensorboardX) and the console."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def _import_tensorboardx_without_torch() -> None:
    """Import tensorboardX while hiding PyTorch from it.

    tensorboardX imports torch whenever it is installed, only so that its writers also accept
    torch tensors; we never pass one. That import costs 2-3 s at the start of every training
    process in an environment that has torch (ours has it for the Hugging Face comparisons).
    A ``None`` entry in ``sys.modules`` makes ``import torch`` raise ImportError, which
    tensorboardX handles; the entry is removed again, so torch imports normally later.
    """
    if "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX  # noqa: F401
        import tensorboardX.summary  # noqa: F401
    finally:
        del sys.modules["torch"]


_import_tensorboardx_without_torch()

import tensorboardX  # noqa: E402  (after the import above, which keeps torch out)
import tensorboardX.summary  # noqa: E402

from jaxformer.config import Config, to_dict  # noqa: E402


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
        """``text`` verbatim in TensorBoard's TEXT tab (which renders Markdown): as a code
        block, so newlines, indentation and characters like ``#``, ``*``, ``<`` survive."""
        if self.writer is not None:
            self.writer.add_text(tag, markdown_code_block(text), step)

    def hparams(self, hparams: dict[str, float | int | str | bool]) -> None:
        """Writes this run's session record for TensorBoard's HPARAMS tab (its hparams, and
        that it ended) into the run's own event file, next to its scalars; the tab shows the
        last value of each scalar tag as the run's metrics.

        No *experiment* record (which columns the tab offers): with none, TensorBoard builds
        it from all sessions and marks the keys whose values differ; a sweep writes its own
        (``jaxformer.sweep.hparams``), which one per run would override at random.
        """
        if self.writer is None:
            return
        _, start, end = tensorboardX.summary.hparams(hparams, {})
        for summary in (start, end):
            self.writer.file_writer.add_summary(summary)

    def final_hparams(self, cfg: Config, eval_metrics: dict[int, dict[str, float]],
                      losses: dict[int, float]) -> None:
        """``hparams`` of the config, when this invocation trained (else the earlier event
        file has them)."""
        if not eval_metrics and not losses:
            return
        self.hparams(flat_hparams(cfg))

    def line(self, text: str) -> None:
        self.echo(text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def markdown_code_block(text: str) -> str:
    """``text`` as an indented Markdown code block (4 spaces before every line): shown as
    typed, whatever it holds (unlike a ``` fence, which text with backticks could close).
    Markdown expands tabs to 4-column stops; leading and trailing blank lines are dropped."""
    return "\n".join("    " + line for line in text.split("\n"))


# Scalar tags a sweep's hparams view compares its runs by (jaxformer.sweep.hparams).
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


def format_metrics(values: dict[str, float]) -> str:
    parts = []
    for name, value in values.items():
        if name == "skipped_steps" and not value:
            continue  # in TensorBoard always, on the console only when there were some
        if name in ("tokens_per_sec",):
            parts.append(f"{name} {value:,.0f}")
        elif name in ("lr",):
            parts.append(f"{name} {value:.2e}")
        elif name == "mfu_percent":
            parts.append(f"mfu {value:.1f}%")
        else:
            parts.append(f"{name} {value:.4g}")
    return " | ".join(parts)
