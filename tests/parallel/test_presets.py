"""On 8 fake CPU devices every mesh preset trains exactly like 1 device, with the expected
parameter shards, and FSDP holds ~1/8 of the data-parallel state per device."""

from __future__ import annotations

import pytest

from tests.parallel.fake_devices import run_with_devices

pytestmark = pytest.mark.slow

SCRIPT = r"""
import dataclasses
import json
import jax
from jaxformer.config import MeshConfig
from tests.train.helpers import random_batch, run_steps, tiny_config
from jaxformer.train.runtime import build_runtime, replicated_fraction

assert jax.device_count() == 8
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
out = {}
for name, overrides in CASES.items():
    cfg = tiny_config(*overrides)
    one, _ = run_steps(dataclasses.replace(cfg, mesh=MeshConfig()), 4, jax.devices()[:1])
    eight, state = run_steps(cfg, 4, jax.devices())
    params = state.params
    blocks = params["blocks"]
    layer = blocks if cfg.model.scan_layers else blocks[0]
    mlp_w = layer["mlp"]["wi"]
    out[name] = {
        "one": one, "eight": eight,
        "w_q": list(layer["attn"]["w_q"].addressable_shards[0].data.shape),
        "mlp_wi": list(mlp_w.addressable_shards[0].data.shape),
        "replicated": replicated_fraction(params),
    }
# Per-device bytes of the compiled step: FSDP against data parallel, on a model whose state
# dwarfs the batch.
mem = {}
for preset in ("data", "fsdp"):
    cfg = tiny_config(f"mesh.preset={preset}", "model.d_model=128", "model.n_heads=4",
                      "model.vocab_size=512")
    rt = build_runtime(cfg, jax.devices())
    state = rt.init_state()
    batch = rt.put_batch(random_batch(cfg, 0))
    report = rt.memory_report(state, rt.train_step.lower(state, batch).compile())
    mem[preset] = report
out["memory"] = mem
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def result() -> dict:
    return run_with_devices(SCRIPT)


CASES = ["data", "fsdp", "fsdp_tensor", "sequence", "fsdp_scan_remat", "expert_moe",
         "fsdp_tensor_moe"]


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
