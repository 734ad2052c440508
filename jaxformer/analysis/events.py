"""Scalars of a run dir, read with TensorBoard's own event reader (what ``tensorboard --logdir``
shows is exactly what this returns)."""

from __future__ import annotations

from pathlib import Path

from jaxformer.errors import UserError


def read_scalars(run_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] sorted by step} of every scalar in ``run_dir``'s event files.

    A resumed run has several event files; later values of a step replace earlier ones (the
    steps a crash repeated).
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"{run_dir} has no TensorBoard event files")
    merged: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        try:
            acc.FirstEventTimestamp()
        except ValueError:
            # The reader stops quietly at the first bad record (a file being written ends in
            # one); a non-empty file without a single readable event is not an event file.
            if f.stat().st_size > 0:
                raise UserError(f"{f} is not a readable TensorBoard event file") from None
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in merged.items()}
