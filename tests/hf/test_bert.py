"""BERT import/export against transformers' BertForMaskedLM and BertForSequenceClassification
(PyTorch CPU, random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.hf import HFConversionError, from_pretrained, save_pretrained  # noqa: E402
from jaxformer.models import presets  # noqa: E402

TOL = 1e-4
VOCAB = 99


def tiny_bert(tmp_path, cls_name="BertForMaskedLM", **overrides):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.1,
                                  **overrides)
    model = getattr(transformers, cls_name)(cfg).eval()
    # Random non-zero biases and norm parameters, so a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    directory = tmp_path / cls_name
    model.save_pretrained(directory)
    return model, directory


def padded_batch(lengths: list[int], t: int, seed: int = 0):
    """Right-padded ids, mask, and token types (type 1 on the second half of each row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (len(lengths), t))
    lengths_ = np.array(lengths)[:, None]
    mask = (np.arange(t)[None, :] < lengths_).astype(np.int64)
    types = ((np.arange(t)[None, :] >= lengths_ // 2) & mask.astype(bool)).astype(np.int64)
    return ids * mask, mask, types


def hf_out(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    return out.logits.numpy()


def test_masked_lm_logits_match_transformers(tmp_path):
    hf_model, directory = tiny_bert(tmp_path)
    ids, mask, types = padded_batch([20, 13, 5], 20)
    model = from_pretrained(directory)
    assert model.config.arch == "encoder" and model.config.num_labels == 0
    ours = np.asarray(model(ids, mask, types))
    theirs = hf_out(hf_model, ids, mask, types)
    real = mask.astype(bool)
    assert ours.shape == theirs.shape == (3, 20, VOCAB)
    assert np.abs(ours[real] - theirs[real]).max() < TOL
    assert np.abs(theirs[real]).max() > 0.5  # not a comparison of two near-zero arrays
    # token types matter: all-zero types give different logits
    assert np.abs(np.asarray(model(ids, mask, np.zeros_like(types))) - ours)[real].max() > 1e-3


def test_masked_lm_export_round_trip(tmp_path):
    hf_model, directory = tiny_bert(tmp_path)
    model = from_pretrained(directory)
    save_pretrained(model, tmp_path / "out")
    reloaded, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    reloaded.eval()
    assert type(reloaded).__name__ == "BertForMaskedLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    ids, mask, types = padded_batch([16, 9], 16, seed=1)
    real = mask.astype(bool)
    theirs = hf_out(hf_model, ids, mask, types)
    assert np.abs(hf_out(reloaded, ids, mask, types) - theirs)[real].max() < TOL
    assert np.abs(np.asarray(model(ids, mask, types)) - theirs)[real].max() < TOL


def test_untied_masked_lm_round_trip(tmp_path):
    hf_model, directory = tiny_bert(tmp_path, tie_word_embeddings=False)
    model = from_pretrained(directory)
    assert not model.config.tie_embeddings
    ids, mask, types = padded_batch([12, 7], 12, seed=2)
    real = mask.astype(bool)
    theirs = hf_out(hf_model, ids, mask, types)
    assert np.abs(np.asarray(model(ids, mask, types)) - theirs)[real].max() < TOL
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_out(reloaded, ids, mask, types) - theirs)[real].max() < TOL


def test_sequence_classification_logits_and_round_trip(tmp_path):
    hf_model, directory = tiny_bert(tmp_path, "BertForSequenceClassification", num_labels=3)
    model = from_pretrained(directory)
    assert model.config.num_labels == 3
    ids, mask, types = padded_batch([18, 11, 4], 18, seed=3)
    theirs = hf_out(hf_model, ids, mask, types)
    ours = np.asarray(model.classify(ids, mask, types))
    assert ours.shape == theirs.shape == (3, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(theirs).max() > 0.1
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    reloaded.eval()
    assert not any(info.values()), info
    assert reloaded.config.num_labels == 3
    assert np.abs(hf_out(reloaded, ids, mask, types) - theirs).max() < TOL


def test_fresh_model_exports_with_same_logits(tmp_path):
    """A jaxformer-initialized BERT (not one read from transformers) exports faithfully."""
    from jaxformer.hf.api import PretrainedModel
    from jaxformer.models.build import init_params

    cfg = presets.bert(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, d_ff=64, max_len=32,
                       init_std=0.2)
    model = PretrainedModel(cfg, init_params(cfg, seed=0), "bert")
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, types = padded_batch([10, 6], 10, seed=4)
    real = mask.astype(bool)
    theirs = hf_out(reloaded, ids, mask, types)
    assert np.abs(np.asarray(model(ids, mask, types)) - theirs)[real].max() < TOL
    assert np.abs(theirs[real]).max() > 0.5


def test_bad_directories_are_refused(tmp_path):
    _, directory = tiny_bert(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["hidden_size"] = 48  # the tensors are still 32 wide
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match=r"tensor bert\.embeddings\.word_embeddings\."
                                                r"weight: expected shape \[99, 48\], "
                                                r"found \[99, 32\]"):
        from_pretrained(directory)
    cfg["hidden_size"] = 32
    cfg["position_embedding_type"] = "relative_key"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="position_embedding_type 'relative_key'"):
        from_pretrained(directory)


def test_unexportable_encoder_is_refused(tmp_path):
    from jaxformer.models.build import init_params

    cfg = presets.bert(n_layers=1, d_model=32, n_heads=4, vocab_size=VOCAB, max_len=16,
                       norm_position="pre", final_norm=True)
    with pytest.raises(HFConversionError, match="BERT needs model.norm_position='post'"):
        save_pretrained((cfg, init_params(cfg, seed=0)), tmp_path / "out", model_type="bert")
