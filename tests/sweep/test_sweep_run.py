"""A real sweep of a tiny experiment through ``jaxformer sweep``: three points (one of them
interrupted before, so it resumes), two at a time; then the runs table, skipping finished
points on a rerun, and the hparams TensorBoard sees."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import statistics

import pytest

from jaxformer.analysis.events import read_scalars
from jaxformer.cli import main
from jaxformer.sweep.runner import checkpoint_step
from jaxformer.sweep.space import load_sweep
from jaxformer.train.loop import train
from tests.corpus import write_corpus
from tests.parallel.fake_devices import compile_cache_env
from tests.sweep.helpers import write_experiment

pytestmark = pytest.mark.slow
LRS = ("0.001", "0.003", "0.01")


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(tmp / "corpus", n_docs=30)
    exp = write_experiment(tmp / "exp.py", 'grid(**{"train.lr": [0.001, 0.003, 0.01]})', corpus)
    sweep_dir = tmp / "sweep"
    # Point 1 was interrupted at step 2 of 4.
    point = load_sweep(exp).points[1]
    train(point.cfg, sweep_dir / point.name, stop_at=2, progress=False, echo=lambda s: None)
    assert checkpoint_step(sweep_dir / point.name) == 2
    with pytest.MonkeyPatch.context() as patch:
        # The points' training processes inherit these (and the session's unoptimized-code
        # flags): the programs the points share (init, eval) are compiled once.
        for key, value in compile_cache_env(tmp / "jax-cache").items():
            patch.setenv(key, value)
        code, out, err = run_main("sweep", str(exp), "--sweep-dir", str(sweep_dir),
                                  "--parallel", "2")
    return exp, sweep_dir, code, out, err


def test_every_point_is_trained_to_the_end(swept):
    _, sweep_dir, code, out, err = swept
    assert code == 0, out + err
    for lr in LRS:
        run = sweep_dir / f"lr={lr}"
        assert checkpoint_step(run) == 4, (run / "train.log").read_text()[-3000:]
        saved = json.loads((run / "config.json").read_text())
        assert saved["train"]["lr"] == float(lr) and saved["train"]["steps"] == 4
        assert f"running lr={lr}" in out and f"finished lr={lr}" in out
    listed = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["name"] for p in listed["points"]] == [f"lr={lr}" for lr in LRS]
    assert "3 finished, 0 skipped, 0 failed" in out


def test_the_interrupted_point_resumed(swept):
    _, sweep_dir, _, out, _ = swept
    assert "running lr=0.003 (4 steps, resuming from step 2)" in out
    log = (sweep_dir / "lr=0.003" / "train.log").read_text()
    assert "resumed" in log and "from step 2" in log
    assert "resumed" not in (sweep_dir / "lr=0.001" / "train.log").read_text()


def test_runs_table_holds_the_event_file_values(swept):
    _, sweep_dir, _, out, _ = swept
    with open(sweep_dir / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [f"lr={lr}" for lr in LRS]
    for row, lr in zip(rows, LRS, strict=True):
        scalars = read_scalars(sweep_dir / row["run"])
        eval_losses = [v for _, v in scalars["eval/loss"]]
        assert row["overrides"] == f"train.lr={lr}"
        assert row["status"] == "finished" and int(row["steps"]) == 4
        assert float(row["best_eval_loss"]) == min(eval_losses)
        assert float(row["final_eval_loss"]) == eval_losses[-1] == scalars["eval/loss"][-1][1]
        assert scalars["eval/loss"][-1][0] == 4
        assert float(row["final_eval_accuracy"]) == scalars["eval/accuracy"][-1][1]
        assert float(row["median_tokens_per_sec"]) == statistics.median(
            v for _, v in scalars["train/tokens_per_sec"])
        assert math.isfinite(float(row["final_eval_loss"]))
    md = (sweep_dir / "runs.md").read_text().splitlines()
    assert len(md) == 5 and md[0].startswith("| run | overrides | status")
    # the console table printed at the end of the sweep, and by `jaxformer runs`
    assert "best_eval_loss" in out and out.count("finished  ") >= 3
    code, table, _ = run_main("runs", str(sweep_dir))
    assert code == 0
    assert [line.split()[0] for line in table.splitlines()[1:4]] == [f"lr={lr}" for lr in LRS]


def test_rerun_skips_finished_points(swept):
    exp, sweep_dir, _, _, _ = swept
    def point_files() -> dict[str, int]:  # the points' checkpoints and event files
        return {str(p): p.stat().st_mtime_ns for p in sweep_dir.rglob("*")
                if p.parent != sweep_dir and ("checkpoints" in p.parts
                                              or p.name.startswith("events.out"))}

    before = point_files()
    code, out, _ = run_main("sweep", str(exp), "--sweep-dir", str(sweep_dir))
    assert code == 0
    assert out.count("] skipped lr=") == 3 and "running" not in out
    assert "0 finished, 3 skipped, 0 failed" in out
    assert point_files() == before and len(before) > 3


def test_hparams_are_in_the_run_event_file(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, sweep_dir, _, _, _ = swept
    run = sweep_dir / "lr=0.01"
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoints"]  # no subdir runs
    (events,) = run.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]  # the same file as the scalars
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(0.01)
    assert start.hparams["train.steps"].number_value == 4
    assert start.hparams["model.norm"].string_value == "layernorm"
    assert start.hparams["model.use_bias"].bool_value is True
    assert "_hparams_/experiment" not in content  # the sweep's record names the columns


def test_tensorboard_hparams_view_shows_what_the_sweep_varied(swept):
    """Through TensorBoard's HTTP API: the HPARAMS tab's columns are train.lr (differing) and
    the headline keys; one row per point with its learning rate and final eval loss."""
    from tests.sweep.tensorboard_http import hparams_view, tensorboard

    _, sweep_dir, _, _, _ = swept
    with tensorboard(sweep_dir) as url:
        experiment, groups = hparams_view(url, n_sessions=3)
    infos = {h["name"]: h.get("differs", False) for h in experiment["hparamInfos"]}
    assert infos == {"train.lr": True, "model.d_model": False, "model.n_layers": False,
                     "train.batch_size": False, "train.steps": False, "objective.kind": False}
    tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"eval/loss", "train/loss"} <= tags
    rows = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(rows) == sorted(f"lr={lr}" for lr in LRS)
    for lr in LRS:
        row = rows[f"lr={lr}"]
        assert row["hparams"]["train.lr"] == pytest.approx(float(lr))
        metrics = {m["name"]["tag"]: m["value"] for m in row["metricValues"]}
        last_eval = read_scalars(sweep_dir / f"lr={lr}")["eval/loss"][-1][1]
        assert metrics["eval/loss"] == pytest.approx(last_eval)
