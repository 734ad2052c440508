"""T5 import/export against transformers' T5ForConditionalGeneration (PyTorch CPU, random
weights): v1.1 (gated-gelu, unscaled head), v1.0 (relu, tied head scaled by d^-0.5) and the
separate lm_head of the original v1.1 checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer.hf import HFConversionError, from_pretrained, save_pretrained  # noqa: E402
from jaxformer.models.build import abstract_model  # noqa: E402

TOL = 1e-4
VOCAB = 99


def tiny_t5(directory, feed_forward_proj: str, tie: bool):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=3, num_heads=4, dropout_rate=0.0,
                                feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    # Norm gains away from 1, so a mis-mapped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(directory)
    return model


@pytest.fixture(params=[("gated-gelu", False), ("relu", True)], ids=["v1_1", "v1_0"])
def t5_dir(request, tmp_path):
    proj, tie = request.param
    return tiny_t5(tmp_path / "hf", proj, tie), tmp_path / "hf", proj


def padded(lengths: list[int], t: int, rng: np.random.Generator):
    ids = rng.integers(2, VOCAB, (len(lengths), t))
    mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


def batch(seed: int = 0):
    """Right padding in both encoder and decoder inputs."""
    rng = np.random.default_rng(seed)
    ids, mask = padded([12, 7, 3], 12, rng)
    dec, dec_mask = padded([9, 4, 6], 9, rng)
    return ids, mask, dec, dec_mask


def hf_logits(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec),
                    decoder_attention_mask=torch.tensor(dec_mask))
    return out.logits.numpy()


def max_diff(ours, theirs, dec_mask) -> float:
    real = dec_mask.astype(bool)
    assert ours.shape == theirs.shape
    assert np.abs(theirs[real]).max() > 0.5  # not a comparison of two near-zero arrays
    return float(np.abs(np.asarray(ours)[real] - theirs[real]).max())


def test_logits_match_transformers_with_padding_and_export_round_trips(t5_dir):
    hf_model, directory, proj = t5_dir
    model = from_pretrained(directory)
    cfg = model.config
    assert cfg.arch == "encoder_decoder" and cfg.n_layers == 2 and cfg.n_decoder_layers == 3
    assert cfg.head_size == 8 and cfg.attention_scale == 1.0
    # transformers 5 ties the head to shared.weight; only v1.0 scales its input.
    assert cfg.tie_embeddings and cfg.scale_tied_logits == (proj == "relu")
    assert cfg.activation == ("geglu_tanh" if proj == "gated-gelu" else "relu")
    ids, mask, dec, dec_mask = batch()
    theirs = hf_logits(hf_model, ids, mask, dec, dec_mask)
    ours = model(ids, dec, mask, dec_mask)
    assert ours.shape == (3, 9, VOCAB)
    assert max_diff(ours, theirs, dec_mask) < TOL

    # Export: transformers loads the directory with the same logits.
    save_pretrained(model, directory.parent / "out")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory.parent / "out").eval()
    assert max_diff(hf_logits(reloaded, ids, mask, dec, dec_mask), theirs, dec_mask) < TOL


def test_separate_lm_head_imports_and_exports(tmp_path):
    """The original v1.1 checkpoints: tie_word_embeddings=false and their own lm_head.weight."""
    from safetensors.numpy import load_file, save_file

    tiny_t5(tmp_path / "base", "gated-gelu", False)
    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    head = np.random.default_rng(0).normal(size=tensors["shared.weight"].shape)
    tensors["lm_head.weight"] = head.astype(np.float32)
    (tmp_path / "hf").mkdir()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))

    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert not np.allclose(hf_model.lm_head.weight.detach().numpy(),
                           hf_model.shared.weight.detach().numpy())
    model = from_pretrained(tmp_path / "hf")
    assert not model.config.tie_embeddings and not model.config.scale_tied_logits
    ids, mask, dec, dec_mask = batch(seed=2)
    theirs = hf_logits(hf_model, ids, mask, dec, dec_mask)
    assert max_diff(model(ids, dec, mask, dec_mask), theirs, dec_mask) < TOL

    save_pretrained((model.config, model.params), tmp_path / "out", model_type="t5")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["tie_word_embeddings"] is False
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff(hf_logits(reloaded, ids, mask, dec, dec_mask), theirs, dec_mask) < TOL


def test_cached_greedy_decode_matches_transformers_greedy(tmp_path):
    hf_model = tiny_t5(tmp_path / "hf", "relu", True)
    pretrained = from_pretrained(tmp_path / "hf")
    graphdef, _ = abstract_model(pretrained.config)
    model = nnx.merge(graphdef, pretrained.params)
    ids, mask, _, _ = batch(seed=3)
    steps = 6
    # Greedy decoding with full forward passes (transformers' generate() indexes its cache by
    # num_layers, which breaks when num_decoder_layers differs).
    expected = np.zeros((ids.shape[0], 1), np.int64)
    expected_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              decoder_input_ids=torch.tensor(expected), use_cache=False).logits
            expected_logits.append(logits[:, -1].numpy())
            expected = np.concatenate([expected, logits[:, -1].argmax(-1).numpy()[:, None]], 1)
    memory = nnx.jit(lambda m, x, s: m.encode(x, s))(model, jnp.asarray(ids), jnp.asarray(mask))
    cache = model.init_cache(ids.shape[0], steps)
    token = jnp.zeros((ids.shape[0], 1), jnp.int32)  # decoder_start_token_id
    out, step_logits = [np.asarray(token)], []
    decode = nnx.jit(lambda m, *args: m.decode(*args))
    for i in range(steps):
        logits, cache = decode(model, token, memory, jnp.asarray(mask), cache, jnp.asarray(i))
        step_logits.append(np.asarray(logits[:, -1]))
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
    np.testing.assert_array_equal(np.concatenate(out, axis=1), expected)
    assert np.abs(np.stack(step_logits) - np.stack(expected_logits)).max() < TOL


def test_unsupported_feed_forward_and_unexportable_layout(tmp_path):
    tiny_t5(tmp_path / "hf", "relu", True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-tanh"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="feed_forward_proj 'gated-tanh'"):
        from_pretrained(tmp_path / "hf")

    from jaxformer.hf import t5
    from jaxformer.models import presets

    with pytest.raises(HFConversionError, match="T5 needs model.pos_encoding='t5_relative'"):
        t5.check_exportable(presets.transformer_2017())
    with pytest.raises(HFConversionError, match="tied head"):
        t5.check_exportable(presets.t5_v1_1(scale_tied_logits=True))
    t5.check_exportable(presets.t5_v1_0())
    t5.check_exportable(presets.t5_v1_1())
