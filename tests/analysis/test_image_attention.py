"""``jaxformer attention`` on a Vision Transformer run: the [CLS] query's attention over a
held-out image, per head, drawn over the image; the drawn weights against a numpy
recomputation from the checkpoint's own q/k weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.analysis.image_attention import cls_attention, figure_pixels
from jaxformer.data import images
from jaxformer.hf.mapping import flatten
from jaxformer.runs.restore import load_run
from jaxformer.train.loop import train

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "vit_digits.py"
HEADS, GRID, PATCH = 4, 4, 2  # vit_digits: 8x8 digits in 2x2 patches


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """vit_digits as a user trains it, tiny and 3 steps long."""
    cfg = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT), [
        "sample.count=0", "checkpoint.async_save=false", "model.n_layers=2",
        "model.d_model=32", "model.d_ff=64", "train.batch_size=16", "train.steps=3",
        "train.warmup_steps=1", "eval.every=1000", "eval.batches=1", "checkpoint.every=3"])
    run = tmp_path_factory.mktemp("vit") / "run"
    train(cfg, run, progress=False, echo=lambda s: None)
    return run


def png_size(path) -> tuple[int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def naive_layer0_cls_row(run: Path, pixels: np.ndarray) -> np.ndarray:
    """[CLS]'s attention probabilities [N, T] in layer 0, from the checkpoint in float64: the
    patches cut by the index formula of docs/vision.md, the embedding, LayerNorm, q and k."""
    cfg, params = load_run(run)
    p = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    m = cfg.model
    patches = np.zeros((GRID * GRID, PATCH * PATCH * m.image_channels))
    for n in range(GRID * GRID):
        for i in range(PATCH):
            for j in range(PATCH):
                for c in range(m.image_channels):
                    patches[n, (i * PATCH + j) * m.image_channels + c] = pixels[
                        PATCH * (n // GRID) + i, PATCH * (n % GRID) + j, c]
    x = np.concatenate([p["patches/cls"][None], patches @ p["patches/w"] + p["patches/b"]])
    x = x + p["inputs/positions/table"][:len(x)]
    h = layer_norm(x, p["blocks/0/attn_norm/scale"], p["blocks/0/attn_norm/bias"], m.norm_eps)
    q = np.einsum("TD,DNH->NTH", h, p["blocks/0/attn/w_q"]) + p["blocks/0/attn/b_q"][:, None]
    k = np.einsum("TD,DNH->NTH", h, p["blocks/0/attn/w_k"]) + p["blocks/0/attn/b_k"][:, None]
    scores = np.einsum("NH,NSH->NS", q[:, 0], k) / np.sqrt(q.shape[-1])
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_cli_draws_cls_attention_over_a_heldout_image(vit_run, tmp_path, capsys):
    out = tmp_path / "maps"
    rc = cli.main(["attention", str(vit_run), "--out", str(out), "--image", "7",
                   "--layers", "0", "-1"])
    printed = capsys.readouterr().out
    assert rc == 0
    pngs = [out / "image7_layer0.png", out / "image7_layer1.png"]
    for png in pngs:
        assert f"wrote {png}" in printed
        assert png_size(png) == figure_pixels(HEADS)  # the image + 4 heads: one row of 5
    data = np.load(out / "attention.npz")
    source = images.create("image:digits", 8, 1, 10)
    np.testing.assert_array_equal(data["pixels"], source.heldout_images[7])
    assert int(data["label"]) == source.heldout_labels[7]
    for layer in (0, 1):
        grid, cls = data[f"layer{layer}"], data[f"layer{layer}_cls"]
        assert grid.shape == (HEADS, GRID, GRID) and cls.shape == (HEADS,)
        # [CLS]'s weight on itself and on the 16 patches: a whole softmax row per head
        np.testing.assert_allclose(cls + grid.sum((1, 2)), 1.0, atol=1e-5)
        full = data[f"layer{layer}_full"]
        np.testing.assert_array_equal(full[:, 0, 1:].reshape(HEADS, GRID, GRID), grid)
    naive = naive_layer0_cls_row(vit_run, data["pixels"].astype(np.float64))
    np.testing.assert_allclose(data["layer0_cls"], naive[:, 0], atol=1e-5)
    np.testing.assert_allclose(data["layer0"], naive[:, 1:].reshape(HEADS, GRID, GRID),
                               atol=1e-5)
    # not uniform: a test of the wiring could otherwise pass on any normalized array
    assert np.abs(naive[:, 1:] - naive[:, 1:].mean(-1, keepdims=True)).max() > 1e-3


def test_default_is_image_0_and_the_last_layer(vit_run, tmp_path, capsys):
    out = tmp_path / "maps"
    assert cli.main(["attention", str(vit_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention.npz", "image0_layer1.png"]


def test_upsampling_covers_each_patch_and_mean_pooling_averages_queries():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 17, 17))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    att = cls_attention(probs, 4, True, 2, 0)
    for y in range(8):
        for x in range(8):
            np.testing.assert_array_equal(att.upsampled[:, y, x],
                                          probs[:, 0, 1 + (y // 2) * 4 + x // 2].astype(
                                              np.float32))
    np.testing.assert_array_equal(att.cls_probs, probs[:, 0, 0].astype(np.float32))
    mean = cls_attention(probs[:, 1:, 1:] / probs[:, 1:, 1:].sum(-1, keepdims=True), 4, False,
                         2, 0)
    np.testing.assert_allclose(mean.patch_probs.sum((1, 2)), 1.0, atol=1e-6)
    assert not mean.cls_probs.any()


@pytest.mark.parametrize("flags, needle", [
    (["--image", "360"], "--image 360 is out of range: image:digits holds 360 held-out images"),
    (["--text", "hello"], "holds an image encoder: it draws a held-out image (--image I)"),
    (["--layers", "5"], "--layers 5 is out of range: the model has 2 layers"),
])
def test_bad_image_attention_flags_are_one_line_errors(vit_run, tmp_path, capsys, flags,
                                                       needle):
    out = tmp_path / "maps"
    assert cli.main(["attention", str(vit_run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not out.exists()
