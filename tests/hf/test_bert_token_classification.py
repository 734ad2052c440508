"""BERT's token classifier (transformers' ``BertForTokenClassification``, PyTorch CPU, random
weights) <-> jaxformer's encoder with a per-token head (``model.token_labels``): logits, export,
and ``jaxformer convert`` both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer import cli  # noqa: E402
from jaxformer.hf import from_pretrained, save_pretrained  # noqa: E402
from jaxformer.runs.restore import load_run  # noqa: E402
from tests.hf.test_bert import hf_out, padded_batch, tiny_bert  # noqa: E402

LABELS = 6
TOL = 1e-5


def test_token_classifier_logits_match_transformers(tmp_path):
    hf_model, directory = tiny_bert(tmp_path, "BertForTokenClassification", num_labels=LABELS)
    model = from_pretrained(directory)
    assert (model.config.token_labels, model.config.num_labels) == (LABELS, 0)
    ids, mask, types = padded_batch([20, 13, 5], 20, seed=5)
    ours = np.asarray(model(ids, mask, types))
    theirs = hf_out(hf_model, ids, mask, types)
    real = mask.astype(bool)
    assert ours.shape == theirs.shape == (3, 20, LABELS)
    diff = np.abs(ours[real] - theirs[real]).max()
    assert diff < TOL, diff
    assert np.abs(theirs[real]).max() > 0.1  # not two near-zero arrays
    assert "pooler" not in model.params and "classifier" not in model.params


def test_token_classifier_exports_and_converts_both_ways(tmp_path, capsys):
    hf_model, directory = tiny_bert(tmp_path, "BertForTokenClassification", num_labels=LABELS)
    ids, mask, types = padded_batch([16, 9], 16, seed=6)
    real = mask.astype(bool)
    theirs = hf_out(hf_model, ids, mask, types)

    save_pretrained(from_pretrained(directory), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    reloaded, info = transformers.AutoModelForTokenClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert reloaded.config.num_labels == LABELS
    assert np.abs(hf_out(reloaded.eval(), ids, mask, types) - theirs)[real].max() < TOL

    run, back = tmp_path / "run", tmp_path / "back"
    assert cli.main(["convert", "--from-hf", str(directory), "--out", str(run)]) == 0
    cfg, _ = load_run(run)
    assert cfg.objective.kind == "token_classification"
    assert (cfg.model.token_labels, cfg.model.num_labels) == (LABELS, 0)
    assert cli.main(["convert", "--to-hf", str(run), "--out", str(back)]) == 0
    capsys.readouterr()
    again = transformers.AutoModelForTokenClassification.from_pretrained(back).eval()
    assert type(again).__name__ == "BertForTokenClassification"
    assert np.abs(hf_out(again, ids, mask, types) - theirs)[real].max() < TOL
