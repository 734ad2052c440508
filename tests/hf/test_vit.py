"""ViT import against transformers' ViTForImageClassification (PyTorch CPU, random weights):
the logits of random pixels, through the Python API and through ``jaxformer convert``."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer import cli  # noqa: E402
from jaxformer.hf import HFConversionError, from_pretrained, save_pretrained  # noqa: E402
from jaxformer.hf.api import PretrainedModel  # noqa: E402
from jaxformer.runs.restore import load_run  # noqa: E402

TOL = 1e-4
IMAGE, PATCH, CHANNELS, LABELS = 16, 4, 3, 5


def tiny_vit(tmp_path, **overrides):
    torch.manual_seed(0)
    shape = dict(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS,
                 num_labels=LABELS)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, **{**shape, **overrides})
    model = transformers.ViTForImageClassification(cfg).eval()
    # Every parameter random and away from its init (norm scales near 1, biases and [CLS]
    # non-zero), so a mis-mapped or transposed one shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    directory = tmp_path / "vit"
    model.save_pretrained(directory)
    return model, directory


def pixels_nchw(batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, CHANNELS, IMAGE, IMAGE)).astype(
        np.float32)


def hf_logits(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.tensor(pixels)).logits.numpy()


def test_vit_classifier_logits_match_transformers(tmp_path):
    hf_model, directory = tiny_vit(tmp_path)
    ours = from_pretrained(directory)
    m = ours.config
    assert (m.patch_size, m.image_size, m.image_channels, m.num_labels) == (PATCH, IMAGE,
                                                                            CHANNELS, LABELS)
    assert (m.pooler, m.norm_eps, m.activation, m.norm_position) == (False, 1e-12, "gelu", "pre")
    assert "pooler" not in ours.params  # ViTForImageClassification has none
    x = pixels_nchw()
    expected = hf_logits(hf_model, x)
    got = np.asarray(ours.classify_image(x.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    assert got.shape == (3, LABELS)
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    # Not trivially close: another image gives other logits.
    assert np.abs(hf_logits(hf_model, pixels_nchw(seed=1)) - expected).max() > 0.1


def digits_vit(tmp_path):
    """A ViT of the shape of ``image:digits`` (8x8 grey, 10 classes), whose run dir can name
    that source."""
    return tiny_vit(tmp_path, image_size=8, patch_size=2, num_channels=1, num_labels=10)


def test_convert_cli_imports_a_vit_run_dir(tmp_path, capsys):
    hf_model, directory = digits_vit(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 0
    assert "8x8x1 images in 2x2 patches, 10 classes" in capsys.readouterr().out
    cfg, params = load_run(out)
    assert cfg.objective.kind == "classification"
    assert (cfg.data.source, cfg.data.seq_len) == ("image:digits", 17)
    # The run dir's weights are the imported ones: same logits as transformers.
    x = np.random.default_rng(3).normal(size=(2, 1, 8, 8)).astype(np.float32)
    got = np.asarray(PretrainedModel(cfg.model, params, "vit").classify_image(
        x.transpose(0, 2, 3, 1)))
    assert np.abs(got - hf_logits(hf_model, x)).max() <= TOL
    # Export is import-only: a one-line refusal, nothing written.
    with pytest.raises(HFConversionError, match="ViT is not supported"):
        save_pretrained((cfg.model, params), tmp_path / "back", model_type="vit")
    assert not (tmp_path / "back").exists()


def test_convert_refuses_a_vit_no_image_source_fits(tmp_path, capsys):
    """A run dir names its data source; 16x16 RGB images with 5 classes have none."""
    _, directory = tiny_vit(tmp_path)
    capsys.readouterr()  # transformers' progress bar of save_pretrained
    out = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "16x16x3 images with 5 classes, which no image data source has" in err
    assert "\n" not in err and not out.exists()


@pytest.mark.parametrize("edit, message", [
    ({"image_size": [16, 32]}, "ViT image_size=\\[16, 32\\] is not square"),
    ({"hidden_act": "silu"}, "ViT hidden_act 'silu' is not supported"),
    ({"qkv_bias": False}, "ViT with qkv_bias=false is not supported"),
    ({"architectures": ["ViTModel"]}, "only ViTForImageClassification"),
    ({"patch_size": 5}, "image_size=16 is not divisible by patch_size=5"),
])
def test_unrepresentable_vit_configs_are_one_line_errors(tmp_path, capsys, edit, message):
    _, directory = tiny_vit(tmp_path)
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    capsys.readouterr()  # transformers' progress bar of save_pretrained
    with pytest.raises(HFConversionError, match=message):
        from_pretrained(directory)
    out = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(directory), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()
