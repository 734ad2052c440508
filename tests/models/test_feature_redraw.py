"""Performer/RFA random features as layer state: drawn once per layer (layers differ), kept
in the parameter dict (so checkpointed), never changed by the optimizer (weight decay
included), and with ``model.feature_redraw = k`` redrawn after every k-th step by the real
train step, as a pure function of (seed, step, layer). Plus LSH's missing key projection.

One compiled train step serves the module (the step compiles slowly on CPU); the run with
``feature_redraw=0`` is tests/models/test_attention_families.py's memorize-a-batch test.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxformer.models.build import abstract_model
from jaxformer.nn.attention_families import FEATURES_NAME, FeatureRedraw, is_feature_path
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.train.flops import count_params
from jaxformer.train.optimizer import decay_mask
from jaxformer.train.runtime import build_runtime
from tests.train.helpers import random_batch, tiny_config

REDRAW = ("model.attention_type=performer", "model.attention_block=8",
          "model.random_features=16", "model.feature_redraw=2", "train.weight_decay=0.5")


def features(params) -> np.ndarray:
    """Both layers' features of the looped layout -> [2, m, H] (a host copy: the step
    donates its input state)."""
    return np.stack([np.asarray(params["blocks"][i]["attn"][FEATURES_NAME]) for i in range(2)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """30 steps on one batch with feature_redraw=2: the initial parameters (host copy), the
    features after each step, the losses, and the features of the state after step 3 saved
    and restored through a checkpoint."""
    cfg = tiny_config(*REDRAW)
    rt = build_runtime(cfg, jax.devices()[:1])
    state = rt.init_state()
    init = jax.device_get(state.params)
    batch = rt.put_batch(random_batch(cfg, 0))
    feats, losses, restored = [features(state.params)], [], None
    for s in range(1, 31):
        state, m = rt.train_step(state, batch)
        feats.append(features(state.params))
        losses.append(float(m["loss"]))
        if s == 3:
            ckpt = Checkpointer(tmp_path_factory.mktemp("ckpt"), keep=1, async_save=False)
            ckpt.save(state, {})
            restored, _ = ckpt.restore(rt.abstract_state())
            ckpt.close()
            restored = features(restored.params)
    return cfg, init, feats, losses, restored


def test_each_layer_draws_its_own_features(run):
    _, _, feats, _, _ = run
    assert feats[0].shape == (2, 16, 8)
    assert not np.array_equal(feats[0][0], feats[0][1])
    # FAVOR+'s draw: orthogonal rows within each block of H.
    rows = feats[0][0][:8] / np.linalg.norm(feats[0][0][:8], axis=1, keepdims=True)
    np.testing.assert_allclose(rows @ rows.T, np.eye(8), atol=1e-5)


def test_features_change_exactly_every_k_steps_and_the_optimizer_leaves_them(run):
    """Weight decay 0.5 and Adam act on every other leaf: the features move only at the
    redraw steps 2, 4, ...; in between they are bitwise unchanged."""
    _, _, feats, _, _ = run
    for s in range(1, 7):
        changed = not np.array_equal(feats[s], feats[s - 1])
        assert changed == (s % 2 == 0), s
    assert not np.array_equal(feats[2][0], feats[2][1])  # redrawn per layer too


def test_redraw_is_a_pure_function_of_seed_and_step(run):
    cfg, init, feats, _, _ = run
    redraw = FeatureRedraw("performer", 2, seed=cfg.train.seed)
    other = FeatureRedraw("performer", 2, seed=cfg.train.seed + 1)
    # One jit for the three calls (each redraw compiles a QR).
    at4, at3, other4 = jax.jit(lambda p: (redraw(p, 4), redraw(p, 3), other(p, 4)))(
        init)
    np.testing.assert_array_equal(features(at4), feats[4])  # what the train step drew
    np.testing.assert_array_equal(features(at3), feats[0])  # not due: kept
    assert not np.array_equal(features(other4), feats[4])


def test_a_checkpoint_keeps_the_features(run):
    _, _, feats, _, restored = run
    np.testing.assert_array_equal(restored, feats[3])


def test_still_memorizes_a_batch_with_redraws(run):
    _, _, _, losses, _ = run
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.6 * losses[0], losses


def test_features_are_state_not_trained_parameters(run):
    _, params, _, _, _ = run
    mask = decay_mask(params)
    assert mask["blocks"][0]["attn"]["w_q"] and not mask["blocks"][0]["attn"][FEATURES_NAME]
    # The scanned layout stacks them [L, m, H]; the path test holds there too.
    scanned = abstract_model(tiny_config(*REDRAW, "model.scan_layers=true").model)[1]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(scanned)[0]
             if is_feature_path(p)]
    assert len(paths) == 1
    # Parameter counts (the log line, bench, AOT) leave the features out.
    total = sum(x.size for x in jax.tree.leaves(params))
    assert count_params(params) == total - 2 * 16 * 8
    assert count_params(scanned) == count_params(params)


def test_lsh_creates_no_key_projection():
    cfg = tiny_config("model.attention_type=lsh", "model.attention_block=8",
                      "model.lsh_buckets=4")
    attn = abstract_model(cfg.model)[1]["blocks"][0]["attn"]
    assert sorted(attn) == ["b_out", "b_q", "b_v", "w_out", "w_q", "w_v"]
