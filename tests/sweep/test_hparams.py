"""hparams records in a run's own event file and a sweep's record of what it varied, as
TensorBoard reads them: its event reader, and its HTTP API (no training)."""

from __future__ import annotations

import contextlib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from jaxformer import config as config_lib
from jaxformer.cli import main
from jaxformer.config import Config
from jaxformer.sweep.hparams import HEADLINE_KEYS, write_sweep_hparams
from jaxformer.sweep.space import load_sweep
from jaxformer.train.reporting import HPARAM_METRICS, Reporter, flat_hparams
from tests.sweep.helpers import write_experiment
from tests.sweep.tensorboard_http import hparams_view, tensorboard


def test_flat_hparams_has_every_leaf_under_its_dotted_key():
    cfg = config_lib.apply_overrides(Config(), ["train.lr=0.02", 'sample.prompts=["a", "b"]'])
    flat = flat_hparams(cfg)
    assert set(flat) == set(config_lib.all_keys(cfg))
    assert flat["train.lr"] == 0.02 and flat["model.n_layers"] == 4
    assert flat["model.use_bias"] is True and flat["sample.prompts"] == "('a', 'b')"


def test_hparams_go_to_the_scalars_event_file(tmp_path):
    reporter = Reporter(tmp_path, echo=lambda s: None)
    reporter.scalars(4, {"loss": 2.5}, "train")
    reporter.scalars(4, {"loss": 2.0, "accuracy": 0.2}, "eval")
    cfg = config_lib.apply_overrides(Config(), ["train.lr=0.02"])
    reporter.final_hparams(cfg, {4: {"loss": 2.0, "accuracy": 0.2}}, {4: 2.5})
    reporter.close()
    (events,) = tmp_path.iterdir()  # one event file, no subdirectory
    acc = EventAccumulator(str(events))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == 0.02
    assert start.hparams["model.norm"].string_value == "layernorm"
    # No experiment record: one per run would hide a sweep's (TensorBoard takes any one).
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}


def test_no_hparams_when_nothing_was_trained(tmp_path):
    reporter = Reporter(tmp_path, echo=lambda s: None)
    reporter.final_hparams(Config(), {}, {})
    reporter.close()
    (events,) = tmp_path.iterdir()
    acc = EventAccumulator(str(events))
    acc.Reload()
    with contextlib.suppress(KeyError):  # KeyError: no data for the plugin at all
        assert acc.PluginTagToContent("hparams") == {}


def test_sweep_hparams_view_opens_on_the_varied_and_headline_keys(tmp_path, capsys):
    """TensorBoard's HPARAMS tab, asked through its HTTP API as its web page asks it: the
    columns are the keys the sweep varies (marked as differing), then the headline keys, not
    the hundred-odd keys every run records; one row per point, with its values and metrics.
    The runs' records are written as training writes them (Reporter), without training."""
    exp = write_experiment(tmp_path / "exp.py",
                           'grid(**{"train.lr": [0.001, 0.01], "model.n_layers": [1, 2]})')
    sweep = load_sweep(exp, ["train.steps=3"])
    sweep_dir = tmp_path / "sweep"
    for i, point in enumerate(sweep.points):
        reporter = Reporter(sweep_dir / point.name, echo=lambda s: None)
        reporter.scalars(3, {"loss": 2.0 + i}, "train")
        reporter.scalars(3, {"loss": 1.0 + i, "accuracy": 0.5, "perplexity": 2.7}, "eval")
        reporter.final_hparams(point.cfg, {3: {"loss": 1.0 + i}}, {3: 2.0 + i})
        reporter.close()
    write_sweep_hparams(sweep, sweep_dir)
    # Written again (a rerun of the sweep): the record is replaced, not doubled.
    code = main(["sweep", str(exp), "--set", "train.steps=3", "--sweep-dir", str(sweep_dir),
                 "--emit", "slurm"])
    capsys.readouterr()
    assert code == 0 and len(list(sweep_dir.glob("events.out.tfevents.*"))) == 1

    with tensorboard(sweep_dir) as url:
        experiment, groups = hparams_view(url, n_sessions=4)
    infos = experiment["hparamInfos"]  # TensorBoard lists the differing ones first
    assert [h["name"] for h in infos] == ["model.n_layers", "train.lr", "model.d_model",
                                          "objective.kind", "train.batch_size", "train.steps"]
    assert [h["name"] for h in infos if h["differs"]] == ["model.n_layers", "train.lr"]
    assert set(HEADLINE_KEYS) <= {h["name"] for h in infos}
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(HPARAM_METRICS)
    rows = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(rows) == sorted(p.name for p in sweep.points)
    for i, point in enumerate(sweep.points):
        hparams = rows[point.name]["hparams"]
        assert hparams["train.lr"] == point.cfg.train.lr
        assert hparams["model.n_layers"] == point.cfg.model.n_layers
        assert hparams["train.steps"] == 3
        metrics = {m["name"]["tag"]: m["value"] for m in rows[point.name]["metricValues"]}
        assert metrics["eval/loss"] == 1.0 + i and metrics["train/loss"] == 2.0 + i
