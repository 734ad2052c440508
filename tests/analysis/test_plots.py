"""`jaxformer plot`: scalars read back with TensorBoard's own reader, PNGs of the right size,
the schedule plotted equals the optimizer's, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.analysis.events import read_scalars
from jaxformer.analysis.plots import plot_schedule
from jaxformer.train.reporting import Reporter
from tests.command_line import EXPERIMENT, assert_user_error, jaxformer


def write_run(run_dir, losses):
    reporter = Reporter(run_dir, echo=lambda s: None)
    for step, loss in losses.items():
        reporter.scalars(step, {"loss": loss}, "eval")
    reporter.close()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_scalars_round_trip_through_tensorboards_reader(tmp_path):
    write_run(tmp_path / "a", {10: 3.5, 20: 2.25, 30: 1.75})
    write_run(tmp_path / "a", {30: 1.5, 40: 1.25})  # a resumed run: step 30 written again
    scalars = read_scalars(tmp_path / "a")
    assert scalars["eval/loss"] == [(10, 3.5), (20, 2.25), (30, 1.5), (40, 1.25)]


def test_plot_runs_and_schedule_write_pngs(tmp_path):
    write_run(tmp_path / "a", {10: 3.5, 20: 2.25})
    write_run(tmp_path / "b", {10: 3.0, 20: 2.0})
    out = jaxformer("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "eval/loss",
                    "--out", str(tmp_path / "curves.png"))
    assert out.returncode == 0, out.stderr
    w, h = png_size(tmp_path / "curves.png")
    assert 500 < w < 1000 and 300 < h < 700  # 7 x 4.5 inches at 100 dpi, trimmed
    out = jaxformer("plot", "--schedule", EXPERIMENT, "--set", "train.steps=100",
                    "--set", "train.warmup_steps=10", "--out", str(tmp_path / "lr.png"))
    assert out.returncode == 0, out.stderr
    assert "peak 0.003" in out.stdout and png_size(tmp_path / "lr.png")[0] > 400


def test_schedule_values_are_the_optimizers():
    cfg = config_lib.apply_overrides(config_lib.Config(), [
        "train.steps=50", "train.warmup_steps=5", "train.lr=1e-3", "train.schedule=wsd"])
    import tempfile
    from pathlib import Path

    lrs = plot_schedule(cfg, Path(tempfile.mkdtemp()) / "s.png")
    assert lrs.shape == (50,) and lrs[0] == 0.0
    np.testing.assert_allclose(lrs[5:40], 1e-3, rtol=1e-6)  # stable until the last 20%
    assert lrs[-1] < 0.2e-3


@pytest.mark.parametrize("args, message", [
    (["plot", "--out", "x.png"], "needs RUN_DIRs"),
    (["plot", "/nonexistent/run", "--out", "x.png"], "does not exist"),
])
def test_plot_errors_are_one_line(args, message):
    assert_user_error(jaxformer(*args), message)


def test_unknown_metric_names_the_ones_there(tmp_path):
    write_run(tmp_path / "a", {1: 1.0})
    assert_user_error(jaxformer("plot", str(tmp_path / "a"), "--metric", "train/los",
                                "--out", str(tmp_path / "x.png")), "eval/loss")
