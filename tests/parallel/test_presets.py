"""On 8 fake CPU devices every mesh preset trains exactly like 1 device, with the expected
parameter shards, and FSDP holds ~1/8 of the data-parallel state per device."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.parallel.fake_devices import run_with_devices

pytestmark = pytest.mark.slow

COMMON = r"""
import dataclasses
import json
import jax
from jaxformer.config import MeshConfig
from tests.train.helpers import random_batch, run_steps, tiny_config

MOE = ["model.n_experts=8", "model.experts_top_k=2", "model.capacity_factor=2.0",
       "model.n_shared_experts=1"]
CASES = {
    "data": [],
    "fsdp": ["mesh.preset=fsdp"],
    "fsdp_tensor": ["mesh.preset=fsdp_tensor"],
    "sequence": ["mesh.preset=sequence"],
    "fsdp_scan_remat": ["mesh.preset=fsdp", "model.scan_layers=true", "model.remat=full"],
    "expert_moe": ["mesh.preset=expert"] + MOE,
    "fsdp_tensor_moe": ["mesh.preset=fsdp_tensor", "mesh.expert=2", "mesh.tensor=2"] + MOE,
}
"""

# Runs the cases in ONE on 1 device (each case's model with the default mesh: the reference)
# and those in EIGHT on 8 devices. Cases that differ only in their mesh have the same 1-device
# config, hence the same program and losses: one reference run serves them all (3 runs for 7).
SCRIPT = COMMON + r"""
from jaxformer.train.runtime import build_runtime, replicated_fraction

assert jax.device_count() == 8
out = {name: {} for name in ONE + EIGHT}
references = {}
for name in ONE:
    cfg = dataclasses.replace(tiny_config(*CASES[name]), mesh=MeshConfig())
    if repr(cfg) not in references:
        references[repr(cfg)] = run_steps(cfg, 4, jax.devices()[:1])[0]
    out[name]["one"] = references[repr(cfg)]
for name in EIGHT:
    cfg = tiny_config(*CASES[name])
    rt = build_runtime(cfg, jax.devices())
    state = rt.init_state()
    eight = []
    for s in range(4):  # as tests.train.helpers.run_steps, keeping the runtime
        batch = rt.put_batch(random_batch(cfg, s))
        state, metrics = rt.train_step(state, batch)
        eight.append(float(metrics["loss"]))
    params = state.params
    blocks = params["blocks"]
    layer = blocks if cfg.model.scan_layers else blocks[0]
    mlp_w = layer["mlp"]["wi"]
    out[name].update({
        "eight": eight,
        "w_q": list(layer["attn"]["w_q"].addressable_shards[0].data.shape),
        "mlp_wi": list(mlp_w.addressable_shards[0].data.shape),
        "replicated": replicated_fraction(params),
    })
    if name in ("data", "fsdp"):
        # Per-device bytes of the compiled step just run (lowering it again hits the compile
        # cache). The tiny model's state (~336 KB under data parallel) dwarfs its batch
        # (320 bytes per device), so the argument bytes are almost all state.
        out[name]["memory"] = rt.memory_report(state, rt.train_step.lower(state, batch).compile())
print(json.dumps(out))
"""

CASES = ["data", "fsdp", "fsdp_tensor", "sequence", "fsdp_scan_remat", "expert_moe",
         "fsdp_tensor_moe"]
# (ONE, EIGHT) of two processes run side by side (XLA compiles on one core; CI has two), with
# about equal work: the references and two 8-device cases (one with MoE); the other five.
PROCESSES = [(CASES, ["fsdp_tensor", "expert_moe"]),
             ([], ["data", "fsdp", "sequence", "fsdp_scan_remat", "fsdp_tensor_moe"])]


@pytest.fixture(scope="module")
def result() -> dict:
    scripts = [f"ONE = {one!r}\nEIGHT = {eight!r}\n{SCRIPT}" for one, eight in PROCESSES]
    with ThreadPoolExecutor(len(scripts)) as pool:
        parts = list(pool.map(run_with_devices, scripts))
    out: dict = {name: {} for name in CASES}
    for part in parts:
        for name, values in part.items():
            out[name].update(values)
    out["memory"] = {name: out[name]["memory"] for name in ("data", "fsdp")}
    return out


@pytest.mark.parametrize("case", CASES)
def test_loss_trajectory_matches_one_device(result, case):
    one, eight = result[case]["one"], result[case]["eight"]
    for a, b in zip(one, eight, strict=True):
        assert abs(a - b) <= 2e-5 * abs(a), (case, one, eight)
    assert len(set(one)) == len(one)  # the steps change the parameters


def test_parameter_shards_have_the_expected_shapes(result):
    # tiny model: d_model 32, 4 heads of 8, mlp 128 (MoE: [8 experts, 32, 128])
    assert result["data"]["w_q"] == [32, 4, 8]
    assert result["fsdp"]["w_q"] == [4, 4, 8]  # embed split 8 ways
    assert result["fsdp"]["mlp_wi"] == [4, 128]
    assert result["fsdp_tensor"]["w_q"] == [8, 2, 8]  # embed over fsdp=4, heads over tensor=2
    assert result["fsdp_tensor"]["mlp_wi"] == [8, 64]
    assert result["fsdp_scan_remat"]["w_q"] == [2, 4, 4, 8]  # [layers, embed/8, heads, dim]
    assert result["expert_moe"]["mlp_wi"] == [1, 32, 128]  # one expert per device
    assert result["fsdp_tensor_moe"]["mlp_wi"] == [4, 16, 64]  # experts/2, embed/2, mlp/2


def test_fsdp_replicates_almost_nothing(result):
    print("replicated parameter bytes:", {k: result[k]["replicated"] for k in CASES})
    assert result["data"]["replicated"] == 1.0
    assert result["fsdp"]["replicated"] < 0.01
    assert result["fsdp_tensor"]["replicated"] < 0.01


def test_fsdp_holds_an_eighth_of_data_parallel_state(result):
    dp, fsdp = result["memory"]["data"], result["memory"]["fsdp"]
    state_ratio = ((fsdp["params_bytes"] + fsdp["opt_state_bytes"])
                   / (dp["params_bytes"] + dp["opt_state_bytes"]))
    compiled_ratio = fsdp["argument_bytes"] / dp["argument_bytes"]  # state + batch, per device
    print(f"FSDP/DP per-device state {state_ratio:.4f}, compiled arguments {compiled_ratio:.4f}")
    assert 0.124 < state_ratio < 0.13
    assert 0.12 < compiled_ratio < 0.14
