"""The peak FLOP/s that MFU divides by: measured once per machine and cached, or stated with
$JAXFORMER_PEAK_FLOPS, and always named in the log with where it came from."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import pytest

from jaxformer import cli
from jaxformer.errors import UserError
from jaxformer.train import flops
from jaxformer.train.loop import train
from tests.train.helpers import tiny_config


@pytest.fixture
def fake_measurement(monkeypatch, tmp_path):
    """An empty cache dir, no stated peak, and a measurement that counts its calls."""
    monkeypatch.setenv("JAXFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(flops.PEAK_ENV_VAR, raising=False)
    calls = []

    def measure(dtype: str = "float32", *args, **kwargs) -> float:
        calls.append(dtype)
        return 1.25e11 * len(calls)  # a different value each call, so reuse is visible

    monkeypatch.setattr(flops, "measure_cpu_matmul_peak", measure)
    monkeypatch.setattr(flops.os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine
    return calls


def test_cpu_peak_is_measured_once_then_read_from_the_cache(fake_measurement, tmp_path):
    cpu = jax.devices("cpu")[0]
    first = flops.peak_flops(cpu, "float32")
    second = flops.peak_flops(cpu, "float32")
    assert fake_measurement == ["float32"]  # the second call did not measure
    assert first.flops == second.flops == 1.25e11
    assert first.source.startswith("measured now") and second.source.startswith("cached")
    cache = tmp_path / "cache" / "peak_flops.json"
    assert str(cache) in second.source and "jaxformer bench --measure-peak" in second.source
    model, cores = flops.cpu_identity()
    entries = json.loads(cache.read_text())
    assert list(entries) == [f"{model} | {cores} cores | float32"]
    assert entries[f"{model} | {cores} cores | float32"]["flops"] == 1.25e11
    assert "125.0 GFLOP/s" in second.describe() and "busy" not in second.source


def test_a_peak_measured_on_a_busy_machine_says_so(fake_measurement, monkeypatch):
    _, cores = flops.cpu_identity()
    monkeypatch.setattr(flops.os, "getloadavg", lambda: (cores + 3.0, 1.0, 1.0))
    cpu = jax.devices("cpu")[0]
    flops.peak_flops(cpu)
    monkeypatch.setattr(flops.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cached = flops.peak_flops(cpu)  # the note belongs to the measurement, not to now
    assert f"load average {cores + 3.0:g} on {cores} cores" in cached.source
    assert "likely low" in cached.source


def test_each_dtype_has_its_own_entry_and_remeasure_replaces_it(fake_measurement):
    cpu = jax.devices("cpu")[0]
    f32 = flops.peak_flops(cpu, "float32").flops
    bf16 = flops.peak_flops(cpu, "bfloat16").flops
    assert fake_measurement == ["float32", "bfloat16"] and f32 != bf16
    again = flops.peak_flops(cpu, "float32", remeasure=True)
    assert fake_measurement == ["float32", "bfloat16", "float32"]
    assert again.flops == 3 * 1.25e11 == flops.peak_flops(cpu, "float32").flops
    assert flops.peak_flops(cpu, "bfloat16").flops == bf16  # untouched by the re-measurement
    assert len(fake_measurement) == 3


def test_unreadable_cache_is_measured_again_and_rewritten(fake_measurement, tmp_path):
    cache = tmp_path / "cache" / "peak_flops.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    peak = flops.peak_flops(jax.devices("cpu")[0])
    assert fake_measurement == ["float32"] and peak.flops == 1.25e11
    assert json.loads(cache.read_text())  # valid again


def test_stated_peak_overrides_measurement_and_data_sheet(fake_measurement, monkeypatch):
    monkeypatch.setenv(flops.PEAK_ENV_VAR, "2.5e11")
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    for device in (jax.devices("cpu")[0], h100):
        peak = flops.peak_flops(device, "bfloat16")
        assert peak.flops == 2.5e11 and peak.source == "JAXFORMER_PEAK_FLOPS=2.5e11"
    assert fake_measurement == []


def test_known_accelerator_uses_its_data_sheet(fake_measurement):
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    peak = flops.peak_flops(h100, "bfloat16")
    assert peak.flops == 989.4e12 and "data sheet" in peak.source
    unknown = flops.peak_flops(SimpleNamespace(device_kind="Mystery X1", platform="gpu"))
    assert math.isnan(unknown.flops) and flops.PEAK_ENV_VAR in unknown.source
    assert fake_measurement == []


@pytest.mark.parametrize("bad", ["fast", "", "0", "-1e11", "inf", "nan"])
def test_bad_stated_peak_is_a_user_error(fake_measurement, monkeypatch, bad):
    monkeypatch.setenv(flops.PEAK_ENV_VAR, bad)
    with pytest.raises(UserError, match="JAXFORMER_PEAK_FLOPS") as info:
        flops.peak_flops(jax.devices("cpu")[0])
    assert "\n" not in str(info.value)


def test_bad_stated_peak_through_the_command_is_one_error_line(fake_measurement, monkeypatch,
                                                               capsys):
    monkeypatch.setenv(flops.PEAK_ENV_VAR, "fast")
    assert cli.main(["bench", "--measure-peak"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: JAXFORMER_PEAK_FLOPS='fast'")


def test_measure_peak_command_remeasures_and_reports(fake_measurement, capsys):
    cpu = jax.devices("cpu")[0]
    flops.peak_flops(cpu)  # cached: 125 GFLOP/s
    assert cli.main(["bench", "--measure-peak"]) == 0
    assert fake_measurement == ["float32", "float32"]
    out = capsys.readouterr().out
    assert out.startswith("peak 250.0 GFLOP/s per device (measured now")
    assert flops.peak_flops(cpu).flops == 2.5e11  # the new value replaced the cached one


def test_bench_without_experiment_or_measure_peak_is_a_user_error(capsys):
    assert cli.main(["bench"]) == cli.EXIT_USER_ERROR
    assert "EXPERIMENT" in capsys.readouterr().err


def test_real_measurement_is_a_plausible_rate():
    rate = flops.measure_cpu_matmul_peak("float32", n=256, repeats=2, min_seconds=0)
    # 2·256³ FLOPs take more than a nanosecond and less than a second on any CPU
    assert 2 * 256**3 < rate < 2 * 256**3 * 1e9


def test_bad_stated_peak_stops_training_before_the_run_dir_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv(flops.PEAK_ENV_VAR, "-5")
    with pytest.raises(UserError, match="JAXFORMER_PEAK_FLOPS='-5'"):
        train(tiny_config(), tmp_path / "run", progress=False, echo=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_an_mfu_above_100_percent_warns_that_the_peak_is_too_low(monkeypatch):
    """A CPU peak measured while the machine was busy once gave 144% MFU on this machine."""
    from jaxformer.train.bench import bench

    monkeypatch.setenv("JAXFORMER_PEAK_FLOPS", "1e3")  # far below any real device
    lines: list[str] = []
    result = bench(tiny_config(), steps=1, warmup=0, echo=lines.append)
    assert result["mfu_percent"] > 100
    assert any(line.startswith("warning: MFU") and "above 100%" in line
               and "--measure-peak" in line for line in lines), lines
    assert flops.implausible_mfu_note(99.9, flops.PeakFlops(1e3, "stated")) is None
