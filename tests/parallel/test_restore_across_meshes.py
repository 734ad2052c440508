"""A checkpoint written on one mesh restores bitwise onto any other: 8-way FSDP -> 1 device,
2-way data parallel, FSDP x tensor parallel (orbax reshards onto the target's shardings), and a
run trained with scanned layers loads into the looped layout for inference."""

from __future__ import annotations

import pytest

from tests.parallel.fake_devices import run_with_devices

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.runs.restore import load_run
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.train.loop import train
from jaxformer.train.optimizer import make_optimizer
from jaxformer.train.runtime import build_runtime
from jaxformer.train.state import abstract_train_state
from jaxformer.parallel.mesh import make_mesh
from tests.corpus import write_corpus
from tests.train.helpers import random_batch, tiny_config

assert jax.device_count() == 8
tmp = Path(tempfile.mkdtemp())
out = {}


def flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- save on 8-way FSDP ------------------------------------------------------------------
src_cfg = tiny_config("mesh.preset=fsdp")
src = build_runtime(src_cfg, jax.devices())
state = src.init_state()
for s in range(3):
    state, _ = src.train_step(state, src.put_batch(random_batch(src_cfg, s)))
saved = flat(jax.device_get(state))
out["saved_w_q_shard"] = list(state.params["blocks"][0]["attn"]["w_q"]
                              .addressable_shards[0].data.shape)
ckpt = Checkpointer(tmp / "ckpt", keep=2)
ckpt.save(state, {"mesh": "fsdp8"})
ckpt.close()
# One more step on the source mesh: what every target must reproduce after restoring.
batch = random_batch(src_cfg, 3)
_, m = src.train_step(state, src.put_batch(batch))
out["next_loss_src"] = float(m["loss"])

# --- restore onto other meshes -----------------------------------------------------------
TARGETS = {
    "one_device": ([], jax.devices()[:1]),
    "data2": (["mesh.data=2"], jax.devices()[:2]),
    "fsdp_tensor": (["mesh.preset=fsdp_tensor", "mesh.fsdp=4", "mesh.tensor=2"], jax.devices()),
}
for name, (overrides, devices) in TARGETS.items():
    cfg = tiny_config(*overrides)
    rt = build_runtime(cfg, devices)
    ckpt = Checkpointer(tmp / "ckpt", keep=2)
    restored, meta = ckpt.restore(rt.abstract_state())
    ckpt.close()
    got = flat(restored)
    want_sharding = flat(rt.state_sharding)
    host = flat(jax.device_get(restored))
    assert set(host) == set(saved), sorted(set(host) ^ set(saved))
    mismatched = [k for k in saved if not (host[k].dtype == saved[k].dtype
                                           and np.array_equal(host[k], saved[k]))]
    wrong_sharding = []
    for k, x in got.items():
        target = want_sharding[k]
        shard_shapes = {tuple(s.data.shape) for s in x.addressable_shards}
        if (not x.sharding.is_equivalent_to(target, x.ndim)
                or shard_shapes != {target.shard_shape(x.shape)}
                or x.sharding.device_set != set(devices)):
            wrong_sharding.append(k)
    out[name] = {
        "n_arrays": len(saved),
        "n_moments": sum(1 for k in saved if ".mu" in k or ".nu" in k),
        "mismatched": mismatched,
        "wrong_sharding": wrong_sharding,
        "n_devices": len(restored.params["blocks"][0]["attn"]["w_q"].sharding.device_set),
        "w_q_shard": list(restored.params["blocks"][0]["attn"]["w_q"]
                          .addressable_shards[0].data.shape),
        "mlp_wi_shard": list(restored.params["blocks"][0]["mlp"]["wi"]
                             .addressable_shards[0].data.shape),
        "mu_w_q_shard": next(list(x.addressable_shards[0].data.shape) for k, x in got.items()
                             if ".mu" in k and "w_q" in k),
        "step": int(restored.step),
        "meta_mesh": meta["mesh"],
    }
    _, m = rt.train_step(restored, rt.put_batch(batch))  # donates ``restored``
    out[name]["next_loss"] = float(m["loss"])

# --- scanned layers -> looped layout ------------------------------------------------------
corpus = write_corpus(tmp / "corpus", n_docs=30)
scan_cfg = config_lib.apply_overrides(Config(), [
    f"data.source={corpus}", "data.seq_len=32", "model.max_len=32", "model.n_layers=3",
    "model.d_model=32", "model.n_heads=2", "model.vocab_size=300", "train.batch_size=8",
    "train.steps=3", "train.warmup_steps=1", "checkpoint.every=3", "log.every=3",
    "eval.every=3", "eval.batches=1", "sample.count=0", "model.scan_layers=true",
    "mesh.preset=fsdp"])
run = tmp / "scan_run"
train(scan_cfg, run, progress=False, echo=lambda s: None)
looped_cfg, looped = load_run(run)
mesh1 = make_mesh(scan_cfg.mesh.__class__(data=1), jax.devices()[:1])
ckpt = Checkpointer(run / "checkpoints", keep=2)
stacked_state, _ = ckpt.restore(abstract_train_state(
    scan_cfg.model, make_optimizer(scan_cfg.train, scan_cfg.model.d_model), mesh1))
ckpt.close()
stacked = jax.device_get(stacked_state.params)
looped = jax.device_get(looped)
n_layers = scan_cfg.model.n_layers
bad = []
n_checked = 0
for i in range(n_layers):
    layer = flat(looped["blocks"][i])
    stacked_blocks = flat(stacked["blocks"])
    assert set(layer) == set(stacked_blocks), sorted(set(layer) ^ set(stacked_blocks))
    for k, x in stacked_blocks.items():
        n_checked += 1
        if x.shape[0] != n_layers or not np.array_equal(layer[k], x[i]):
            bad.append(f"{i}{k}")
rest = flat({k: v for k, v in stacked.items() if k != "blocks"})
rest_looped = flat({k: v for k, v in looped.items() if k != "blocks"})
assert set(rest) == set(rest_looped)
bad += [k for k in rest if not np.array_equal(rest[k], rest_looped[k])]
out["scan"] = {
    "looped_scan_layers": looped_cfg.model.scan_layers,
    "block_keys": sorted(looped["blocks"]),
    "n_checked": n_checked + len(rest),
    "mismatched": bad,
    "stacked_w_q": list(stacked["blocks"]["attn"]["w_q"].shape),
    "looped_w_q": list(looped["blocks"][0]["attn"]["w_q"].shape),
}
print(json.dumps(out))
"""

TARGETS = ["one_device", "data2", "fsdp_tensor"]


@pytest.fixture(scope="module")
def result() -> dict:
    return run_with_devices(SCRIPT, 8)


@pytest.mark.parametrize("target", TARGETS)
def test_every_array_restores_bitwise(result, target):
    r = result[target]
    assert r["mismatched"] == [], r["mismatched"]
    assert r["n_arrays"] > 20 and r["n_moments"] >= 2 * 10  # params, Adam mu and nu, counts
    assert r["step"] == 3 and r["meta_mesh"] == "fsdp8"


@pytest.mark.parametrize("target", TARGETS)
def test_restored_arrays_have_the_target_sharding(result, target):
    r = result[target]
    assert r["wrong_sharding"] == [], r["wrong_sharding"]


def test_shard_shapes(result):
    # tiny model: d_model 32, 4 heads of 8, mlp 128
    assert result["saved_w_q_shard"] == [4, 4, 8]  # saved with embed split 8 ways
    assert result["one_device"]["n_devices"] == 1
    assert result["one_device"]["w_q_shard"] == [32, 4, 8]
    assert result["data2"]["n_devices"] == 2
    assert result["data2"]["w_q_shard"] == [32, 4, 8]  # replicated on both
    assert result["fsdp_tensor"]["n_devices"] == 8
    assert result["fsdp_tensor"]["w_q_shard"] == [8, 2, 8]  # embed / fsdp 4, heads / tensor 2
    assert result["fsdp_tensor"]["mlp_wi_shard"] == [8, 64]
    assert result["fsdp_tensor"]["mu_w_q_shard"] == [8, 2, 8]  # moments follow their param


@pytest.mark.parametrize("target", TARGETS)
def test_training_continues_identically_on_the_new_mesh(result, target):
    src, got = result["next_loss_src"], result[target]["next_loss"]
    assert abs(got - src) <= 2e-5 * abs(src), (target, src, got)


def test_scanned_run_loads_into_the_looped_layout(result):
    r = result["scan"]
    assert r["looped_scan_layers"] is False
    assert r["block_keys"] == [0, 1, 2]
    assert r["stacked_w_q"][0] == 3 and r["stacked_w_q"][1:] == r["looped_w_q"]
    assert r["n_checked"] > 3 * 5
    assert r["mismatched"] == [], r["mismatched"]
