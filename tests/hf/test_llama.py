"""Llama and Mistral import/export against transformers (PyTorch CPU, random weights)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxformer.hf import (  # noqa: E402
    HFConversionError,
    PretrainedModel,
    from_pretrained,
    save_pretrained,
)
from jaxformer.models import presets  # noqa: E402
from jaxformer.models.build import abstract_model  # noqa: E402

TOL = 1e-4
VOCAB = 101


def tiny(tmp_path, family: str, **overrides):
    """A random transformers model saved to tmp_path/hf: 4 query heads sharing 2 kv heads."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                  initializer_range=0.1, **overrides)
    if family == "mistral":
        cfg, cls = transformers.MistralConfig(**kwargs), transformers.MistralForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a mis-mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def right_padded(lengths: list[int], t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (len(lengths), t))
    mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids),
                    attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


@pytest.mark.parametrize(("family", "overrides"), [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 4}),
])
def test_logits_match_transformers(tmp_path, family, overrides):
    hf_model, directory = tiny(tmp_path, family, **overrides)
    model = from_pretrained(directory)
    assert model.config.kv_heads == 2 and model.config.pos_encoding == "rope"
    ids, mask = right_padded([14, 9, 3], 14)
    ours, theirs = np.asarray(model(ids, mask)), hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < TOL
    assert np.abs(theirs[real]).std() > 0.1  # not two near-constant arrays


def test_mistral_window_is_exercised(tmp_path):
    """With a 4-token window over 14 tokens the logits differ from full causal attention, and
    ours still match: the window, not luck, is what agrees."""
    hf_model, directory = tiny(tmp_path, "mistral", sliding_window=4)
    model = from_pretrained(directory)
    assert model.config.sliding_window == 4
    ids, _ = right_padded([14], 14)
    no_window = PretrainedModel(dataclasses.replace(model.config, sliding_window=0),
                                model.params, "mistral")
    assert np.abs(np.asarray(model(ids)) - np.asarray(no_window(ids)))[0, 4:].max() > 1e-3
    assert np.abs(np.asarray(model(ids)) - hf_logits(hf_model, ids)).max() < TOL


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}),
                                                   ("mistral", {"sliding_window": 3})])
def test_kv_cache_decoding_matches_transformers(tmp_path, family, overrides):
    """Prompt, then one token at a time through the cache (past the sliding window)."""
    hf_model, directory = tiny(tmp_path, family, **overrides)
    loaded = from_pretrained(directory)
    graphdef, _ = abstract_model(loaded.config)
    model = nnx.merge(graphdef, loaded.params)
    ids, _ = right_padded([12], 12, seed=3)
    theirs = hf_logits(hf_model, ids)
    cache = model.init_cache(1, 12)
    logits, cache = model.decode(jnp.asarray(ids[:, :5]), cache, jnp.asarray(0))
    steps = [np.asarray(logits)]
    for i in range(5, 12):
        logits, cache = model.decode(jnp.asarray(ids[:, i:i + 1]), cache, jnp.asarray(i))
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - theirs).max() < TOL
    assert cache[0]["k"].shape == (1, 2, 12, 8)  # kv heads (not query heads), heads first


@pytest.mark.parametrize(("family", "overrides", "auto"), [
    ("llama", {}, transformers.AutoModelForCausalLM),
    ("mistral", {"sliding_window": 5}, transformers.AutoModelForCausalLM),
])
def test_export_round_trip(tmp_path, family, overrides, auto):
    hf_model, directory = tiny(tmp_path, family, **overrides)
    model = from_pretrained(directory)
    # Exported from a (config, params) pair, as a training run would: the family is inferred.
    save_pretrained((model.config, model.params), tmp_path / "out")
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.model_type == family
    ids, mask = right_padded([10, 7], 10, seed=1)
    real = mask.astype(bool)
    assert np.abs(hf_logits(reloaded, ids, mask) - hf_logits(hf_model, ids, mask))[real].max() \
        < TOL


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path):
    import json

    _, directory = tiny(tmp_path, "llama")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="rope_type 'llama3'"):
        from_pretrained(directory)


def test_export_refuses_a_layout_no_family_holds():
    cfg = presets.llama(n_layers=1, d_model=16, n_heads=2, vocab_size=11, norm="scalenorm")
    _, abstract = abstract_model(cfg)
    params = nnx.to_pure_dict(abstract)
    with pytest.raises(HFConversionError, match=r"llama: Llama needs model\.norm='rmsnorm'"):
        save_pretrained((cfg, params), "/nonexistent/never-written")
