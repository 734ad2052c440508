"""The efficient attention families as config choices: each trains through the real train
step (packed documents, padding) and memorizes a batch; bad combinations are config errors;
a family's kernel is an ordinary value (equal options compare equal); a family without a
decode state (all but linear) refuses generation.

The families' mathematics is tested against the papers' definitions in tests/nn/
(test_block_sparse, test_random_features, test_linear_attention, test_lsh_attention,
test_aft); tests/test_every_choice.py trains each once through the whole run set-up.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.nn.attention_families import FAMILIES, FamilyKernel
from tests.train.helpers import make_runner, random_batch, tiny_config

# Rows of 16 tokens (two packed documents, 3 padding positions): 8-token blocks and chunks.
FAMILY_OPTIONS = {
    "longformer": (), "bigbird": ("model.sparse_random=1",),
    "performer": ("model.random_features=32",), "rfa": ("model.random_features=32",),
    "linear": (), "lsh": ("model.lsh_buckets=4",), "aft_full": (),
    "aft_local": ("model.sliding_window=4",), "aft_simple": (),
}


def test_every_family_has_options_here():
    assert sorted(FAMILY_OPTIONS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_memorizes_a_batch_through_the_train_step(family):
    cfg = tiny_config(f"model.attention_type={family}", "model.attention_block=8",
                      *FAMILY_OPTIONS[family])
    state, step, sharding = make_runner(cfg)
    batch = jax.device_put(random_batch(cfg, 0), sharding)
    before = jax.device_get(state.params)  # a host copy: the step donates the state
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)), losses
    assert losses[0] > 0.9 * np.log(64)  # starts near uniform over the vocabulary
    assert losses[-1] < 0.6 * losses[0], losses  # learns: memorizes the batch
    if family in ("performer", "rfa"):  # features: one draw per layer, kept (feature_redraw=0)
        w = [before["blocks"][i]["attn"]["random_features"] for i in range(2)]
        assert w[0].shape == (32, 8) and not np.array_equal(w[0], w[1])
        for i in range(2):
            np.testing.assert_array_equal(state.params["blocks"][i]["attn"]["random_features"],
                                          w[i])


@pytest.mark.parametrize("overrides, match", [
    (("model.attention_type=longformer", "model.attention_block=5"),
     "attention_block=5 must divide data.seq_len=16"),
    (("model.attention_type=bigbird", "model.attention_block=8", "model.sparse_global=3"),
     "more global tokens than data.seq_len=16"),
    (("model.attention_type=performer", "model.pos_encoding=alibi"), "no additive attention bias"),
    (("model.attention_type=linear", "objective.kind=prefix_lm"), "prefix-LM"),
    (("model.attention_type=lsh", "model.attention_block=8", "model.lsh_buckets=5"),
     "even model.lsh_buckets"),
    (("model.attention_type=aft_local",), "sliding_window > 0"),
    (("model.attention_type=rfa", "model.sliding_window=4"), "sliding_window=0"),
    (("model.attention_type=aft_full", "model.attention_dropout=0.1"), "attention_dropout=0"),
    (("model.attention_type=linear", "model.arch=encoder_decoder"), "not encoder-decoder"),
    (("model.attention_type=linear", "model.feature_redraw=5"),
     "feature_redraw=5 redraws random features: it needs model.attention_type='performer' or "
     "'rfa' \\(got 'linear'\\)"),
    (("model.feature_redraw=5",), "got 'mha'"),
    (("model.attention_type=performer", "model.feature_redraw=-1"),
     "model.feature_redraw: -1 must be >= 0"),
])
def test_bad_family_settings_are_one_line_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        config_lib.validate(tiny_config(*overrides))
    assert "\n" not in str(info.value)


def test_family_kernels_compare_by_value():
    a = FamilyKernel("bigbird", block=8, n_random=1)
    assert a == FamilyKernel("bigbird", block=8, n_random=1) and hash(a) == hash(
        FamilyKernel("bigbird", block=8, n_random=1))
    assert a != FamilyKernel("bigbird", block=8, n_random=2)
    with pytest.raises(ValueError, match="unknown kernel family"):
        FamilyKernel("dense")


def test_a_family_without_a_decode_state_refuses_generation():
    from jaxformer.errors import UserError
    from jaxformer.inference.families import family_for
    from jaxformer.models.build import abstract_model

    cfg = tiny_config("model.attention_type=performer")
    graphdef, _ = abstract_model(cfg.model)
    with pytest.raises(UserError, match="'performer' trains and evaluates but does not decode"):
        family_for(cfg, graphdef)
