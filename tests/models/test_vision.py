"""The Vision Transformer (``model.patch_size > 0``): the patch embedding is a strided
convolution, the 2-D sin-cos positions are the MAE formula, the classifier reads the pixels and
not the batch, bad image configs are one-line errors, and the experiment learns and resumes
bitwise through the real training set-up."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.aot.report import abstract_batch
from jaxformer.config import ConfigError
from jaxformer.hf.api import infer_model_type
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.models import build_model, presets
from jaxformer.models.vision import PatchEmbedding, patchify
from jaxformer.nn.positional import sinusoidal_2d_encoding
from jaxformer.train.bench import synthetic_batch
from jaxformer.train.loop import train
from jaxformer.train.runtime import build_runtime

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "vit_digits.py"


def vit(**overrides):
    """A tiny ViT config: 8x8x3 images in 2x2 patches (16 + [CLS]), 5 classes."""
    return presets.vit(**{**dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, patch_size=2,
                                 image_size=8, image_channels=3, num_labels=5, max_len=17,
                                 init_std=0.2), **overrides})


@functools.cache
def _compiled(graphdef: nnx.GraphDef, method: str):
    return jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))


def run(model, method: str, *args) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled(graphdef, method)(state, *args))


def pixels(seed: int, b: int = 3, side: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((b, side, side, c), np.float32)


# --- the front end -----------------------------------------------------------------------------

def test_patchify_order_is_row_major_with_channels_last():
    x = pixels(0, b=2, side=6, c=2)
    p, g = 3, 2
    got = np.asarray(patchify(jnp.asarray(x), p))
    assert got.shape == (2, g * g, p * p * 2)
    for n in range(g * g):
        for i in range(p):
            for j in range(p):
                for c in range(2):
                    want = x[:, p * (n // g) + i, p * (n % g) + j, c]
                    np.testing.assert_array_equal(got[:, n, (i * p + j) * 2 + c], want)


@pytest.mark.parametrize("patch,side,channels", [(2, 8, 3), (4, 8, 1), (1, 4, 2)])
def test_patch_embedding_is_a_strided_convolution(patch, side, channels):
    """ViT's linear map of flattened patches == a conv with kernel = stride = patch."""
    cfg = vit(patch_size=patch, image_size=side, image_channels=channels, pooling="mean",
              max_len=(side // patch) ** 2)
    embed = PatchEmbedding(cfg, rngs=nnx.Rngs(1))
    embed.b[...] = jax.random.normal(jax.random.key(2), embed.b.shape)
    x = pixels(3, side=side, c=channels)
    got = np.asarray(embed(jnp.asarray(x)))
    kernel = embed.w[...].reshape(patch, patch, channels, cfg.d_model)  # HWIO
    conv = jax.lax.conv_general_dilated(
        jnp.asarray(x), kernel, window_strides=(patch, patch), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    want = np.asarray(conv + embed.b[...]).reshape(len(x), -1, cfg.d_model)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sinusoidal_2d_equals_the_naive_formula():
    rows, cols, d, base = 3, 5, 16, 100.0
    got = sinusoidal_2d_encoding(rows, cols, d, base)
    q = d // 4
    want = np.zeros((rows * cols, d))
    for n in range(rows * cols):
        r, c = n // cols, n % cols
        for i in range(q):
            w = base ** (-i / q)
            want[n, i], want[n, q + i] = math.sin(r * w), math.cos(r * w)
            want[n, 2 * q + i], want[n, 3 * q + i] = math.sin(c * w), math.cos(c * w)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # A patch's row and column each own half of the channels: patches in one row share them.
    np.testing.assert_array_equal(got[:cols, :2 * q], np.broadcast_to(got[0, :2 * q],
                                                                      (cols, 2 * q)))
    with pytest.raises(ValueError, match="multiple of 4"):
        sinusoidal_2d_encoding(2, 2, 6)


def test_sinusoidal_2d_is_added_to_the_patches_and_not_to_cls():
    with_pe = PatchEmbedding(vit(pos_encoding="sinusoidal_2d"), rngs=nnx.Rngs(0))
    without = PatchEmbedding(vit(), rngs=nnx.Rngs(0))  # the same draws: the same weights
    with_pe.cls[...] = without.cls[...] = jnp.arange(32.0)
    x = jnp.asarray(pixels(1))
    diff = np.asarray(with_pe(x) - without(x))
    np.testing.assert_allclose(diff[:, 0], 0.0)
    np.testing.assert_allclose(diff[:, 1:], np.broadcast_to(
        sinusoidal_2d_encoding(4, 4, 32), (3, 16, 32)), atol=1e-6)


# --- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "sinusoidal_2d"},
                                       {"pooling": "mean", "max_len": 16}],
                         ids=["learned_cls", "sincos_cls", "mean"])
def test_logits_are_finite_and_read_the_pixels(overrides):
    model = build_model(vit(**overrides), nnx.Rngs(0))
    x = pixels(0)
    logits = run(model, "classify_image", x)
    assert logits.shape == (3, 5) and np.isfinite(logits).all()
    states = run(model, "encode_image", x)
    assert states.shape == (3, model.cfg.image_tokens, 32)
    moved = x.copy()
    moved[:, 6:, 6:] = 1.0 - moved[:, 6:, 6:]  # one 2x2 patch (the last) changed
    assert np.abs(run(model, "classify_image", moved) - logits).min() > 1e-4
    # Rows are images of their own: only the rows whose pixels changed change.
    one = x.copy()
    one[1] = pixels(9, b=1)[0]
    out = run(model, "classify_image", one)
    np.testing.assert_array_equal(out[[0, 2]], logits[[0, 2]])
    assert np.abs(out[1] - logits[1]).min() > 1e-4


def test_a_prediction_does_not_depend_on_its_batch():
    model = build_model(vit(), nnx.Rngs(0))
    x = pixels(4, b=6)
    whole = run(model, "classify_image", x)
    for i in range(6):
        alone = run(model, "classify_image", x[i:i + 1])
        np.testing.assert_allclose(alone[0], whole[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(model, "classify_image", x[::-1].copy()), whole[::-1],
                               rtol=1e-5, atol=1e-6)


def test_parameters_and_their_logical_axes():
    cls_model = build_model(vit(), nnx.Rngs(0))
    mean_model = build_model(vit(pooling="mean", max_len=16), nnx.Rngs(0))
    assert cls_model.embed is None and mean_model.patches.cls is None
    assert cls_model.patches.w.get_metadata()["logical_axes"] == (None, "embed")
    assert cls_model.patches.w.shape == (2 * 2 * 3, 32)
    for path, var in nnx.iter_graph(cls_model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var.ndim, path
    with pytest.raises(ValueError, match="classify_image"):
        cls_model.classify(jnp.ones((1, 17), jnp.int32), jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="8x8x3"):
        cls_model.patches(jnp.ones((1, 8, 8, 1)))


def test_an_image_encoder_is_not_exported_as_bert():
    """BERT's layout has no patch embedding: export names the key instead of writing a BERT
    whose word embeddings are missing."""
    bert_like = presets.bert(num_labels=5, patch_size=2, image_size=8, image_channels=3,
                             max_len=17)
    with pytest.raises(HFConversionError, match="bert: BERT needs model.patch_size=0"):
        infer_model_type(bert_like)


# --- bad configs -------------------------------------------------------------------------------

BAD = [
    (["model.image_size=9"], "model.image_size=9 is not divisible by model.patch_size=2"),
    (["model.max_len=16"], "model.max_len=16 is shorter than an image's 17 tokens"),
    (["data.seq_len=16", "model.max_len=16"], "shorter than an image's 17 tokens"),
    (["data.seq_len=20", "model.max_len=20"], "set data.seq_len=17"),
    (["model.num_labels=0"], "model.num_labels >= 2"),
    (["model.arch=decoder"], "needs model.arch='encoder'"),
    (["model.image_channels=0"], "model.image_channels > 0"),
    (["model.patch_size=-1"], "model.patch_size: -1 must be >= 0"),
    (["model.pos_encoding=sinusoidal_2d", "model.d_model=34", "model.n_heads=2"],
     "d_model divisible by 4"),
    (["model.patch_size=0"], "holds images: it needs an image encoder"),
    (["data.source=stdlib"], "needs an image data.source (image:digits)"),
    (["data.source=image:cifar"], "unknown image data source 'image:cifar'"),
    (["model.image_channels=3"], "set model.image_size=8 and model.image_channels=1"),
    (["model.num_labels=5"], "has 10 classes; model.num_labels must be 10"),
    (["data.image_shift=8"], "smaller than the image"),
    (["data.image_shift=-1"], "data.image_shift: -1 must be >= 0"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_image_config_is_one_line(overrides, needle):
    cfg = config_lib.load_experiment(EXPERIMENT)
    with pytest.raises(ConfigError) as info:
        config_lib.apply_overrides(cfg, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_image_options_on_a_text_model_are_refused():
    for bad in (["model.pos_encoding=sinusoidal_2d"], ["data.image_shift=1"]):
        with pytest.raises(ConfigError, match="model.patch_size > 0"):
            config_lib.apply_overrides(config_lib.Config(), bad)


def test_cli_bad_image_size_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["train", str(EXPERIMENT), "--set", "model.image_size=7", "--run-dir",
                     str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: model.image_size=7 is not divisible by model.patch_size=2: the patches must "
        "tile the image"], err
    assert not run_dir.exists()


def test_compile_and_bench_batches_fit_the_image_model():
    """``jaxformer compile``'s abstract batch and ``jaxformer bench``'s synthetic one have the
    image batch's shapes, and the train step traces with them."""
    cfg = _experiment("model.n_layers=1", "train.batch_size=4")
    rt = build_runtime(cfg, jax.devices()[:1])
    abstract = abstract_batch(rt)
    host = synthetic_batch(cfg)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in host.items()}
    assert abstract["pixels"].shape == (4, 8, 8, 1)
    rt.train_step.lower(rt.abstract_state(), abstract)  # traces: the shapes agree


# --- training through the real set-up ----------------------------------------------------------

def _experiment(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT), [
        "sample.count=0", "checkpoint.async_save=false", *overrides])


def test_vit_digits_learns(tmp_path):
    """The experiment as a user runs it, shortened: held-out accuracy over all 360 images
    (majority class: 0.133) well above chance after 150 steps."""
    cfg = _experiment("train.steps=150", "eval.every=150", "log.every=50")
    result = train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    accuracy = result.eval_metrics[150]["accuracy"]
    assert result.baseline_name == "majority class" and result.unigram_baseline < 0.14
    assert accuracy >= 0.85, accuracy


def test_resume_is_bitwise_exact(tmp_path):
    """Stopped at step 4 and resumed == 8 steps in one go: batches, image shifts and dropout
    keys are pure functions of (seed, step)."""
    cfg = _experiment("model.n_layers=1", "model.d_model=32", "model.d_ff=64",
                      "train.batch_size=16", "train.steps=8", "train.warmup_steps=2",
                      "eval.every=4", "eval.batches=2", "log.every=1", "checkpoint.every=4",
                      "data.image_shift=1")
    assert cfg.model.dropout > 0
    whole = train(cfg, tmp_path / "whole", progress=False, echo=lambda s: None)
    first = train(cfg, tmp_path / "split", stop_at=4, progress=False, echo=lambda s: None)
    second = train(cfg, tmp_path / "split", progress=False, echo=lambda s: None)
    assert first.final_step == 4 and second.start_step == 4
    assert {**first.losses, **second.losses} == whole.losses  # exact float equality
    assert second.eval_metrics[8] == whole.eval_metrics[8]
