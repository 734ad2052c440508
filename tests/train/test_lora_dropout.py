"""LoRA dropout (``lora.dropout > 0``): the adapters run as branches beside their frozen kernels,
``x W0 + s * (drop(x) A) B``. Without dropout the branches give the merged weights' logits; the
dropout drops each input element of a branch with its rate (checked element by element on
identity adapters); every kernel and layer gets its own mask; combinations that cannot run
branches are one-line config errors. Whole runs are in tests/train/test_lora.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.models import lora
from jaxformer.models.build import abstract_model, init_params
from jaxformer.nn.feedforward import FeedForward
from jaxformer.nn.lora_branch import attach, branch_output
from tests.command_line import EXPERIMENT, assert_user_error, jaxformer
from tests.train.helpers import random_batch, tiny_config


def random_adapters(params, cfg, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                        lora.adapter_shapes(params, cfg.lora))


@pytest.mark.parametrize("scan", [False, True])
def test_branches_without_dropout_give_the_merged_weights_logits(scan):
    cfg = tiny_config("lora.rank=3", "lora.alpha=5", 'lora.targets=["all"]',
                      f"model.scan_layers={str(scan).lower()}")
    params = init_params(cfg.model, 0)
    adapters = random_adapters(params, cfg, 1)
    factor = lora.scale(cfg.lora)
    graphdef = abstract_model(cfg.model)[0]
    batch = random_batch(cfg, 0)

    @jax.jit
    def logits(p, ad):
        model = nnx.merge(graphdef, p)
        if ad is not None:
            lora.attach_branches(model, ad, factor, 0.0, jax.random.key(0))
        return model(batch["inputs"], batch["positions"], batch["segment_ids"])

    merged = np.asarray(logits(lora.merge(params, adapters, factor), None))
    branched = np.asarray(logits(params, adapters))
    base = np.asarray(logits(params, None))
    assert np.abs(merged - base).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(branched, merged, rtol=1e-5, atol=1e-5)


def identity_branch(rate: float, key: int, width: int = 64) -> tuple[FeedForward, np.ndarray]:
    """A feed-forward whose ``wi`` has the branch A = B = identity (s = 1): the branch's output
    is its dropped input. -> (module, x [256, width])."""
    ff = FeedForward(width, width, activation="relu", use_bias=False, init_std=0.02,
                     out_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
    eye = jnp.eye(width)
    attach(ff, "wi", eye, eye, jax.random.key(key), 1.0, rate)
    x = np.random.default_rng(key).uniform(0.5, 1.5, (256, width)).astype(np.float32)
    return ff, x


def test_dropout_drops_each_input_element_at_its_rate():
    rate = 0.25
    ff, x = identity_branch(rate, key=3)
    out = np.asarray(branch_output(ff, "wi", jnp.asarray(x)))
    ratio = out / x
    kept = ratio > 0
    # Every element is dropped (0) or kept and scaled by 1 / (1 - rate) (inverted dropout).
    np.testing.assert_allclose(ratio[kept], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(ratio[~kept], 0.0)
    assert abs((~kept).mean() - rate) < 0.02, (~kept).mean()  # 16384 draws: sd 0.0034
    # The same key drops the same elements; another key other ones.
    again = np.asarray(branch_output(ff, "wi", jnp.asarray(x)))
    np.testing.assert_array_equal(again, out)
    other, _ = identity_branch(rate, key=4)
    assert not np.array_equal(np.asarray(branch_output(other, "wi", jnp.asarray(x))) > 0, kept)
    # Rate 0: the branch is its input exactly.
    plain, _ = identity_branch(0.0, key=3)
    np.testing.assert_array_equal(np.asarray(branch_output(plain, "wi", jnp.asarray(x))), x)


def test_a_module_without_branch_has_no_output():
    ff, x = identity_branch(0.5, key=0)
    assert branch_output(ff, "wo", jnp.asarray(x)) is None


@pytest.mark.parametrize("scan", [False, True])
def test_every_kernel_and_layer_gets_its_own_key(scan):
    cfg = tiny_config("lora.rank=2", 'lora.targets=["q", "v"]', "model.n_layers=3",
                      f"model.scan_layers={str(scan).lower()}")
    params = init_params(cfg.model, 0)
    graphdef = abstract_model(cfg.model)[0]
    model = nnx.merge(graphdef, params)
    lora.attach_branches(model, random_adapters(params, cfg, 0), 1.0, 0.1, jax.random.key(7))
    keys = []
    for name in lora.select_targets(params, cfg.lora.targets):
        var = getattr(lora.owner(model, name), "lora_" + name.rsplit("/", 1)[1])
        assert var.rate == 0.1 and var.scale == 1.0
        data = np.asarray(jax.random.key_data(var.get_value()["key"]))
        keys += [tuple(k) for k in data.reshape(-1, data.shape[-1])]
    assert len(keys) == 3 * 2 and len(set(keys)) == len(keys)


@pytest.mark.parametrize("overrides, message", [
    (["lora.dropout=1.0"], "lora.dropout"),
    (["lora.dropout=-0.1"], "lora.dropout"),
    (["lora.rank=0", "lora.dropout=0.1"], "lora.rank=0 has no adapters"),
    (["model.reversible=true", "model.d_ff=64"], "model.reversible"),
    (["model.ff_chunks=2", 'lora.targets=["mlp"]'], "model.ff_chunks=2"),
    (["model.attention_type=mla", "model.kv_lora_rank=16", "model.qk_rope_head_dim=4",
      "model.qk_nope_head_dim=8", "model.v_head_dim=8", 'lora.targets=["q"]'],
     "MultiHeadLatentAttention"),
])
def test_combinations_without_branches_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny_config("lora.rank=2", "lora.dropout=0.1", *overrides)
    assert "\n" not in str(info.value)


def test_lora_dropout_on_a_supported_model_is_accepted():
    cfg = tiny_config("lora.rank=2", "lora.dropout=0.1", 'lora.targets=["all"]',
                      "model.activation=swiglu", "model.scan_layers=true")
    assert cfg.lora.dropout == 0.1
    config_lib.apply_overrides(cfg, ["model.ff_chunks=2", 'lora.targets=["q"]'])


def test_a_bad_dropout_on_the_command_line_is_one_error_line(tmp_path):
    run = tmp_path / "run"
    out = jaxformer("train", EXPERIMENT, "--set", "lora.dropout=0.2", "--run-dir", str(run))
    assert_user_error(out, "lora.dropout=0.2", "lora.rank=0")
    assert not run.exists()
