"""``jaxformer bench``'s JSON line: clean types and units a script or a person can read."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import jax
import pytest

from jaxformer import cli
from jaxformer.parallel.mesh import MESH_AXES

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "data.seq_len=32", "model.max_len=32", "train.batch_size=4"]


def significant_digits(x: float) -> int:
    digits = f"{x:.15g}".lstrip("-").replace(".", "").split("e")[0].strip("0")
    return len(digits)


@pytest.fixture(scope="module")
def result() -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMER_PEAK_FLOPS", "2e11")  # a stated peak: MFU can be checked exactly
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["bench", str(ROOT / "experiments" / "gpt_tiny.py"),
                             *[a for o in TINY for a in ("--set", o)], "--steps", "2",
                             "--warmup", "1"])
    assert code == 0
    lines = out.getvalue().strip().splitlines()
    assert "peak 200.0 GFLOP/s per device (JAXFORMER_PEAK_FLOPS=2e11)" in lines[0]
    return json.loads(lines[-1])


def test_device_and_mesh_are_named_plainly(result):
    assert result["device"] == jax.devices()[0].device_kind  # "cpu", not "cpu:cpu"
    assert result["device"] == "cpu"
    # every mesh axis with its size; on one device the data preset is all ones
    assert result["mesh"] == {axis: 1 for axis in MESH_AXES}
    assert result["mesh_preset"] == "data" and result["n_devices"] == 1


def test_counts_are_integers(result):
    for key in ("params", "flops_per_token", "n_devices", "batch_size", "seq_len"):
        assert type(result[key]) is int, key
    memory = result["memory"]
    assert {"params_bytes", "opt_state_bytes"} <= memory.keys()
    for key, value in memory.items():
        if key.endswith("_bytes") or key == "devices":
            assert type(value) is int, key
    # float32 parameters: 4 bytes each on the one device
    assert memory["params_bytes"] == 4 * result["params"]
    # 1 layer, d 32, vocab 300, T 32: 6 * (4*32^2 + 2*32*128 + 300*32) + 6*1*32*32
    assert result["flops_per_token"] == 6 * (4 * 32**2 + 2 * 32 * 128 + 300 * 32) + 6 * 32 * 32


def test_rates_are_rounded_and_mfu_is_a_percentage(result):
    for key in ("tokens_per_sec", "step_time_s", "step_time_min_s", "mfu_percent"):
        assert significant_digits(result[key]) <= 4, (key, result[key])
    assert "mfu" not in result  # one unit: the percentage
    assert result["peak_flops"] == 2e11
    assert result["peak_flops_source"] == "JAXFORMER_PEAK_FLOPS=2e11"
    # tokens per second is batch * seq_len / median step time (both rounded)
    assert math.isclose(result["tokens_per_sec"], 4 * 32 / result["step_time_s"], rel_tol=2e-3)
    expected = 100 * result["flops_per_token"] * result["tokens_per_sec"] / 2e11
    # mfu_percent has 3 significant digits: half a unit of the third is up to 0.5% of it (at a
    # leading 1: 1.9039 -> 1.90), plus tokens_per_sec's own rounding to 4 digits.
    assert math.isclose(result["mfu_percent"], expected, rel_tol=5.5e-3)
    assert result["step_time_min_s"] <= result["step_time_s"]
