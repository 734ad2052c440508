"""On 8 fake CPU devices the data-parallel step gives the losses of 1 device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.parallel.fake_devices import FAST_COMPILE

SCRIPT = r"""
import json
import jax
from tests.train.helpers import run_steps, tiny_config, make_runner, random_batch
assert jax.device_count() == 8, jax.device_count()
cfg = tiny_config("train.grad_accum=1")
# One fixed batch: the loss must fall, so the steps provably update the parameters.
one, _ = run_steps(cfg, 5, jax.devices()[:1], fixed_batch=True)
eight, state = run_steps(cfg, 5, jax.devices(), fixed_batch=True)
_, _, sharding = make_runner(cfg, jax.devices())
batch = jax.device_put(random_batch(cfg, 0), sharding)
shard_rows = sorted({s.data.shape[0] for s in batch["inputs"].addressable_shards})
print(json.dumps({"one": one, "eight": eight, "shard_rows": shard_rows,
                  "n_shards": len(batch["inputs"].addressable_shards)}))
"""


def test_eight_devices_match_one_device():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n_shards"] == 8 and result["shard_rows"] == [1]  # 8 rows, one per device
    for a, b in zip(result["one"], result["eight"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (result["one"], result["eight"])
    assert result["one"][-1] < result["one"][0]
