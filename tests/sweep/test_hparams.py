"""hparams records in a run's own event file, readable by TensorBoard (no training)."""

from __future__ import annotations

import contextlib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.train.reporting import Reporter, final_metrics, flat_hparams


def test_flat_hparams_has_every_leaf_under_its_dotted_key():
    cfg = config_lib.apply_overrides(Config(), ["train.lr=0.02", 'sample.prompts=["a", "b"]'])
    flat = flat_hparams(cfg)
    assert set(flat) == set(config_lib.all_keys(cfg))
    assert flat["train.lr"] == 0.02 and flat["model.n_layers"] == 4
    assert flat["model.use_bias"] is True and flat["sample.prompts"] == "('a', 'b')"


def test_final_metrics_are_the_last_values_under_scalar_tags():
    evals = {2: {"loss": 3.0, "accuracy": 0.1, "perplexity": 20.0},
             4: {"loss": 2.0, "accuracy": 0.2, "perplexity": 7.4, "exact_match": 0.5}}
    assert final_metrics(evals, {1: 5.0, 4: 2.5, 3: 3.0}) == {
        "eval/loss": 2.0, "eval/accuracy": 0.2, "eval/perplexity": 7.4, "train/loss": 2.5}
    assert final_metrics({}, {1: 5.0}) == {"train/loss": 5.0}


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
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    tags = [m.name.tag for m in experiment.metric_infos]
    assert tags == ["eval/loss", "eval/accuracy", "train/loss"]
    assert set(tags) <= set(acc.Tags()["scalars"])


def test_no_hparams_when_nothing_was_trained(tmp_path):
    reporter = Reporter(tmp_path, echo=lambda s: None)
    reporter.final_hparams(Config(), {}, {})
    reporter.close()
    (events,) = tmp_path.iterdir()
    acc = EventAccumulator(str(events))
    acc.Reload()
    with contextlib.suppress(KeyError):  # KeyError: no data for the plugin at all
        assert acc.PluginTagToContent("hparams") == {}
