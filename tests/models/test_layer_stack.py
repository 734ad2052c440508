"""Scanned layers and remat: the same numbers as the plain Python loop over blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.models import build_model, presets
from jaxformer.models.build import abstract_model
from jaxformer.models.layer_stack import REMAT_POLICIES, stack_params, unstack_params
from jaxformer.objectives import get_objective
from jaxformer.train.step import make_loss_sums

SMALL = dict(n_layers=3, d_model=32, n_heads=4, vocab_size=61, max_len=16)


def _batch(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t = 2, 12
    tokens = rng.integers(1, 61, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, -3:] = 0  # padding at the end of row 1
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
             "segment_ids": seg, "positions": np.broadcast_to(np.arange(t), (b, t)).astype(
                 np.int32), "loss_weights": (seg > 0).astype(np.float32)}
    if arch == "encoder_decoder":
        batch.update(enc_inputs=rng.integers(1, 61, (b, t)).astype(np.int32),
                     enc_segment_ids=seg, enc_positions=batch["positions"])
    return batch


CONFIGS = {
    "gpt2": presets.gpt2(**SMALL),
    "llama_moe": presets.llama(**SMALL, n_kv_heads=2, n_experts=4, experts_top_k=2,
                               capacity_factor=0.0),
    "bert": presets.bert(**SMALL),
    "t5": presets.t5_v1_1(**SMALL, n_decoder_layers=2),
}


# The objective each architecture trains here: its model call.
FORWARD = {"decoder": get_objective("causal").logits,
           "encoder": get_objective("masked_lm").logits,
           "encoder_decoder": get_objective("span_corruption").logits}


def _loss_and_grads(cfg, params, batch, moe=None):
    graphdef, _ = abstract_model(cfg)
    loss_sums = make_loss_sums(graphdef, FORWARD[cfg.arch], moe=moe)

    def loss(p):
        sums = loss_sums(p, batch)
        return sums["loss_sum"] / sums["weight_sum"], sums

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_stack_equals_loop(name):
    cfg = CONFIGS[name]
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0))))
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = stack_params(params)
    # The stacked tree is exactly what a scanned model holds.
    template = nnx.to_pure_dict(abstract_model(scanned_cfg)[1])
    assert jax.tree.structure(template) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, template) == jax.tree.map(jnp.shape, stacked)
    batch = _batch(cfg.arch)
    moe = (0.01, 0.001) if cfg.n_experts else None
    (loss_a, sums_a), grads_a = _loss_and_grads(cfg, params, batch, moe)
    (loss_b, sums_b), grads_b = _loss_and_grads(scanned_cfg, stacked, batch, moe)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for key in sums_a:
        np.testing.assert_allclose(sums_b[key], sums_a[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stack_params(grads_a)), jax.tree.leaves(grads_b),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    if moe:  # router statistics collected from inside the scan
        assert float(sums_a["moe_load_balance_loss_sum"]) > 0


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_the_same_gradients(policy, scan):
    cfg = dataclasses.replace(CONFIGS["gpt2"], scan_layers=scan)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(1))))
    batch = _batch("decoder", 1)
    (loss_a, _), grads_a = _loss_and_grads(cfg, params, batch)
    (loss_b, _), grads_b = _loss_and_grads(dataclasses.replace(cfg, remat=policy), params,
                                           batch)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_remat_reduces_saved_activations():
    """With remat=full the backward pass keeps fewer bytes of residuals than without."""
    cfg = dataclasses.replace(CONFIGS["gpt2"], n_layers=4, scan_layers=True)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0))))
    batch = _batch("decoder")

    def residual_bytes(policy: str) -> int:
        graphdef, _ = abstract_model(dataclasses.replace(cfg, remat=policy))
        loss_sums = make_loss_sums(graphdef, FORWARD[cfg.arch])
        _, vjp = jax.vjp(lambda p: loss_sums(p, batch)["loss_sum"], params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp)
                   if hasattr(x, "dtype"))

    none, full = residual_bytes("none"), residual_bytes("full")
    print(f"residuals saved for the backward pass: none {none} B, full {full} B")
    assert full < 0.7 * none


def test_stack_unstack_round_trip():
    cfg = CONFIGS["t5"]
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(2))))
    again = unstack_params(stack_params(params))
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
