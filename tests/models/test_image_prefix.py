"""The image-prefix decoder (``model.arch='image_prefix'``): the image's projected patches are a
bidirectional prefix and the text is causal (checked against the definition by perturbing
inputs), cached decoding (prefill + steps) gives the full forward's logits, a frozen vision
tower stays bitwise unchanged through training while the rest learns, and bad configs are
one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.models import build_model, presets
from jaxformer.models.decoder import prefix_mask
from jaxformer.models.image_prefix import image_patches

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "caption_digits.py"


def tiny(**overrides):
    """8x8x2 images in 4x4 patches (4 of them), a 1-block tower, a 2-block decoder."""
    return presets.image_prefix(**{**dict(n_layers=2, vision_layers=1, d_model=32, n_heads=4,
                                          d_ff=64, patch_size=4, image_size=8,
                                          image_channels=2, vocab_size=11, max_len=12,
                                          init_std=0.2), **overrides})


@functools.cache
def _compiled(graphdef: nnx.GraphDef):
    return jax.jit(lambda state, pixels, tokens: nnx.merge(graphdef, state)(pixels, tokens))


def forward(model, pixels, tokens) -> np.ndarray:
    """The model's logits, jitted (eager op-by-op dispatch is far slower)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled(graphdef)(state, jnp.asarray(pixels), jnp.asarray(tokens)))


def inputs(seed: int, b: int = 2, length: int = 6):
    rng = np.random.default_rng(seed)
    return (rng.random((b, 8, 8, 2), np.float32),
            rng.integers(0, 11, (b, length)).astype(np.int32))


def test_text_is_causal_and_reads_the_whole_image():
    model = build_model(tiny(), nnx.Rngs(0))
    pixels, tokens = inputs(0)
    base = forward(model, pixels, tokens)
    assert base.shape == (2, 6, 11)
    # A later text token changes no earlier position's logits, and does change its own.
    later = tokens.copy()
    later[:, 4] = (later[:, 4] + 1) % 11
    changed = forward(model, pixels, later)
    np.testing.assert_array_equal(changed[:, :4], base[:, :4])
    assert np.abs(changed[:, 4:] - base[:, 4:]).max() > 1e-4
    # Every text position reads every part of the image: changing only the last patch (the
    # image's bottom-right 4x4) changes the first text position's logits.
    corner = pixels.copy()
    corner[:, 4:, 4:] += 1.0
    assert np.abs(forward(model, corner, tokens)[:, 0] - base[:, 0]).min() > 1e-5
    # Rows are independent.
    np.testing.assert_allclose(forward(model, pixels[:1], tokens[:1]), base[:1], atol=1e-6)


def test_the_image_prefix_attends_both_ways():
    """The first patch's state depends on the last patch (bidirectional prefix): the decoder
    with the prefix marks gives different logits from the same vectors read causally, and
    equals the definition ``[[1, 0], [1, causal]]`` built by hand as a dense mask."""
    model = build_model(tiny(), nnx.Rngs(1))
    pixels, tokens = inputs(1)
    vectors, positions, segments, prefix = model.sequence(jnp.asarray(pixels),
                                                          jnp.asarray(tokens), None, None)
    ids = jnp.zeros(positions.shape, jnp.int32)
    dec = model.decoder
    bidirectional = np.asarray(dec(ids, positions, segments, prefix=prefix, vectors=vectors))
    causal = np.asarray(dec(ids, positions, segments, vectors=vectors))
    n = image_patches(model.cfg)
    assert n == 4 and int(prefix.sum(axis=1)[0]) == n
    # Two float32 paths through the same math (the decoder called eagerly here, the model's
    # forward jitted): their roundings differ by ~1e-6 on logits of ~1.5 (seen 1.9e-6).
    np.testing.assert_allclose(bidirectional[:, n:], forward(model, pixels, tokens), rtol=1e-5,
                               atol=1e-5)
    assert np.abs(bidirectional[:, 0] - causal[:, 0]).max() > 1e-4
    # The same through a hand-built mask: query t sees key s when s <= t or both are patches.
    total = positions.shape[1]
    t, s = np.arange(total)[:, None], np.arange(total)[None, :]
    visible = (s <= t) | ((t < n) & (s < n))
    np.testing.assert_array_equal(np.asarray(prefix_mask(prefix))[0, 0], visible)


def test_cached_decoding_equals_the_full_forward():
    model = build_model(tiny(), nnx.Rngs(2))
    pixels, tokens = inputs(2, length=5)
    full = forward(model, pixels, tokens)
    n = image_patches(model.cfg)
    cache = model.init_cache(2, n + tokens.shape[1])
    logits, cache = model.prefill(jnp.asarray(pixels), jnp.asarray(tokens[:, :2]), cache)
    steps = [np.asarray(logits)]
    for i in range(2, tokens.shape[1]):
        logits, cache = model.decode(jnp.asarray(tokens[:, i:i + 1]), cache,
                                     jnp.asarray(n + i, jnp.int32))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_generate_matches_a_greedy_loop_over_the_full_forward():
    """The common generation API (``ImagePrefixFamily``) decodes what argmax over repeated
    full forwards gives."""
    from jaxformer.inference.families import ImagePrefixFamily
    from jaxformer.inference.generate import Generator
    model = build_model(tiny(), nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    family = ImagePrefixFamily(model.cfg, graphdef, decoder_start_id=1)
    pixels, _ = inputs(3, b=3)
    gens = Generator(family, nnx.to_pure_dict(state), pad_id=0).generate(list(pixels), 5)
    # Text is causal, so a row padded past its end gives the same logits where it is real.
    tokens = np.zeros((3, 6), np.int32)
    tokens[:, 0] = 1
    for i in range(5):
        tokens[:, i + 1] = forward(model, pixels, tokens)[:, i].argmax(-1)
    for row in range(3):
        assert gens[row].tokens == tokens[row, 1:].tolist(), row


def _cfg(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT), list(overrides))


def test_frozen_vision_tower_is_bitwise_unchanged_by_training(tmp_path):
    from jaxformer.models.build import init_params
    from jaxformer.runs.restore import load_run
    from jaxformer.train.loop import train
    cfg = _cfg("model.n_layers=1", "model.vision_layers=1", "model.d_model=32",
               "model.d_ff=64", "train.batch_size=4", "train.steps=3", "train.warmup_steps=1",
               "eval.every=3", "eval.batches=1", "log.every=1", "checkpoint.every=1",
               "checkpoint.keep=3", "model.freeze_vision=true", "model.dropout=0")
    train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    _, before = load_run(tmp_path / "run", step=1)
    _, after = load_run(tmp_path / "run", step=3)
    # The init itself: the tower equals a fresh init up to float rounding (the trainer inits
    # under jit); steps 1 -> 3 are compared bitwise.
    fresh = init_params(cfg.model, cfg.train.seed)["vision"]
    leaves = jax.tree_util.tree_leaves
    for x, y in zip(leaves(fresh), leaves(after["vision"]), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)
    for part, same in (("vision", True), ("projector", False), ("decoder", False)):
        a = jax.tree_util.tree_leaves(before[part])
        b = jax.tree_util.tree_leaves(after[part])
        equal = all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(a, b, strict=True))
        assert equal == same, part
    # Fine-tuning from this run: the architecture comes from it, but which parameters train is
    # the new experiment's choice (its freeze_vision=false is kept, not the source's true).
    from jaxformer.train.init_from import model_from_source
    tuned = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, freeze_vision=False, d_model=64, d_ff=128),
        train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "run")))
    got, note = model_from_source(tuned)
    assert got.model.freeze_vision is False and (got.model.d_model, got.model.d_ff) == (32, 64)
    assert "freeze_vision" not in note and "d_model 64 -> 32" in note


@pytest.mark.parametrize("overrides,message", [
    (("model.image_size=26",), r"model.image_size=26 is not divisible by model.patch_size=4"),
    (("model.vision_layers=0",), r"needs a vision tower: set model.vision_layers >= 1"),
    (("model.max_len=40",), r"shorter than an image's 36 patches \+ data.seq_len=6 text tokens"),
    (("data.seq_len=5",), r"5 words \+ EOS = 6 decoder tokens, more than data.seq_len=5"),
    (("model.image_size=16",), r"holds 24x24 images of 1 channel: set model.image_size=24"),
    (("data.source=caption:faces",), r"unknown caption source 'caption:faces'"),
    (("model.attention_type=linear",), r"needs model.attention_type='mha'"),
    (("model.vocab_size=10",), r"need model.vocab_size >= 14"),
    (("model.pos_encoding=sinusoidal_2d",), r"is the vision tower's own"),
    (("model.arch=decoder",), r"model.vision_layers=3 shapes an image-prefix decoder's vision "
                              r"tower: it needs model.arch='image_prefix' \(got 'decoder'\)"),
])
def test_bad_input_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(*overrides)
    assert "\n" not in str(info.value)


def test_vision_keys_without_an_image_prefix_model_are_refused():
    cfg = config_lib.load_experiment(EXPERIMENT.parent / "gpt_tiny.py")
    with pytest.raises(ConfigError, match=r"model.freeze_vision=true shapes .* needs "
                                          r"model.arch='image_prefix'"):
        config_lib.validate(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, freeze_vision=True)))


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jaxformer.cli", "train", str(EXPERIMENT),
                          "--run-dir", str(run_dir), "--set", "model.patch_size=5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "patch_size=5" in lines[0]
    assert not run_dir.exists()
