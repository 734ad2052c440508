"""The sweep's record for TensorBoard's HPARAMS tab: which config keys it varied.

Every run records all its config values (``Reporter.final_hparams``: one session per run dir).
Left to itself, the hparams plugin would list all of them (over a hundred) without telling
which ones differ. A sweep therefore writes one *experiment* record into an event file at the
root of the sweep dir, naming the keys the points vary (marked as differing) and a few headline
keys, plus the metrics to compare; ``tensorboard --logdir <sweep dir>`` then opens the HPARAMS
tab on those columns, one row per point. The plugin takes the experiment from the one run that
has it (runs write none themselves).
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from jaxformer.sweep.space import Sweep

# tensorboardX as jaxformer.train.reporting imports it (without PyTorch: see there).
from jaxformer.train.reporting import HPARAM_METRICS, flat_hparams, tensorboardX

Summary = tensorboardX.proto.summary_pb2.Summary
SummaryMetadata = tensorboardX.proto.summary_pb2.SummaryMetadata

# Shown after the varied keys, so that every sweep's table says what was trained, and how long.
HEADLINE_KEYS = ("model.d_model", "model.n_layers", "train.lr", "train.batch_size",
                 "train.steps", "objective.kind")
# The event file of the record; an earlier one is replaced when the sweep runs again.
SUFFIX = ".sweep_hparams"


def varied_keys(sweep: Sweep) -> list[str]:
    """Config keys whose values differ between the sweep's points, in the order the points
    name them (``sweep()``'s keys first, then any other key that differs as a result)."""
    values = [flat_hparams(p.cfg) for p in sweep.points]
    differs = {k for k in values[0] if k != "name" and len({repr(v[k]) for v in values}) > 1}
    named = [k for p in sweep.points for k in p.overrides]
    ordered = list(dict.fromkeys([*named, *sorted(values[0])]))
    return [k for k in ordered if k in differs]


def _type(value: object) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(value, int | float):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def sweep_experiment(sweep: Sweep) -> api_pb2.Experiment:
    """The experiment record: the varied keys (``differs``), then the headline keys; the
    metrics of ``HPARAM_METRICS``."""
    varied = varied_keys(sweep)
    base = flat_hparams(sweep.points[0].cfg)
    keys = [*varied, *(k for k in HEADLINE_KEYS if k not in varied)]
    return api_pb2.Experiment(
        description=f"sweep of {sweep.experiment.name}: {len(sweep.points)} points",
        hparam_infos=[api_pb2.HParamInfo(name=k, type=_type(base[k]), differs=k in varied)
                      for k in keys],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t))
                      for t in HPARAM_METRICS])


def write_sweep_hparams(sweep: Sweep, sweep_dir: Path | str) -> Path:
    """Writes the experiment record into ``sweep_dir`` (replacing an earlier one) -> its file."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for old in sweep_dir.glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()
    content = plugin_data_pb2.HParamsPluginData(experiment=sweep_experiment(sweep),
                                                version=metadata.PLUGIN_DATA_VERSION)
    summary = Summary(value=[Summary.Value(
        tag=metadata.EXPERIMENT_TAG, metadata=SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                   content=content.SerializeToString())))])
    writer = tensorboardX.FileWriter(str(sweep_dir), filename_suffix=SUFFIX)
    writer.add_summary(summary)
    writer.close()
    (path,) = sweep_dir.glob(f"events.out.tfevents.*{SUFFIX}")
    return path
