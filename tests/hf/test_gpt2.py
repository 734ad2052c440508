"""GPT-2 import/export against transformers' GPT2LMHeadModel (PyTorch CPU, random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.hf import HFConversionError, from_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4


def tiny_gpt2(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  initializer_range=0.1, bos_token_id=0, eos_token_id=0,
                                  **overrides)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Random non-zero biases and norm parameters, so a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "ln_" in name:  # norm gains near 1
                p.normal_(1.0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def right_padded_batch(vocab: int, lengths: list[int], t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), t))
    mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def test_logits_match_transformers_with_right_padding(tmp_path):
    hf_model, directory = tiny_gpt2(tmp_path)
    ids, mask = right_padded_batch(97, [20, 13, 5], 20)
    ours = np.asarray(from_pretrained(directory)(ids, mask))
    theirs = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == theirs.shape == (3, 20, 97)
    assert np.abs(ours[real] - theirs[real]).max() < TOL
    assert np.abs(theirs[real]).max() > 0.5  # the comparison is not between two near-zero arrays


def test_export_round_trip_loads_in_transformers_with_same_logits(tmp_path):
    hf_model, directory = tiny_gpt2(tmp_path)
    model = from_pretrained(directory)
    save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = right_padded_batch(97, [16, 9], 16, seed=1)
    real = mask.astype(bool)
    diff = np.abs(hf_logits(reloaded, ids, mask) - hf_logits(hf_model, ids, mask))[real]
    assert diff.max() < TOL
    ours = np.asarray(model(ids, mask))
    assert np.abs(ours - hf_logits(reloaded, ids, mask))[real].max() < TOL


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _, directory = tiny_gpt2(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["n_embd"] = 64  # the tensors are still 48 wide
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match=r"tensor transformer\.wte\.weight: expected shape "
                                                r"\[97, 64\], found \[97, 48\]"):
        from_pretrained(directory)


def test_missing_tensor_and_unsupported_architecture(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, directory = tiny_gpt2(tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(HFConversionError,
                       match=r"missing tensor transformer\.h\.1\.mlp\.c_fc\.bias"):
        from_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="unsupported architecture 'bloom'"):
        from_pretrained(directory)
