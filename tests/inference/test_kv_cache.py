"""KV-cache decoding against the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import DecoderLM


def make_model(pos_encoding="learned"):
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_len=40,
                      pos_encoding=pos_encoding)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_kv_cache_decoding_equals_full_forward():
    for pos_encoding in ("learned", "sinusoidal"):
        model = make_model(pos_encoding)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 20)))
        full = np.asarray(model(tokens, jnp.broadcast_to(jnp.arange(20), (2, 20))))
        cache = model.init_cache(2, 20)
        # A 7-token prompt, then one token at a time.
        logits, cache = model.decode(tokens[:, :7], cache, jnp.asarray(0))
        steps = [np.asarray(logits)]
        for i in range(7, 20):
            logits, cache = model.decode(tokens[:, i:i + 1], cache, jnp.asarray(i))
            steps.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_rows_at_different_slots_equal_rows_decoded_alone():
    """A [B] cache index (continuous batching: each row at its own slot) gives each row the
    logits and cache it gets decoded alone with a scalar index (RoPE + GQA, and MLA)."""
    from jaxformer.models import presets
    from tests.nn.test_mla import mla_config

    cfgs = [presets.llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=61,
                          max_len=40), mla_config()]
    decode = nnx.jit(lambda m, tokens, cache, index: m.decode(tokens, cache, index))
    for cfg in cfgs:
        model = DecoderLM(cfg, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(1)
        lengths = [5, 9]
        alone = []
        for n in lengths:
            cache = model.init_cache(1, 16)
            _, cache = decode(model, jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n))),
                              cache, jnp.asarray(0))
            alone.append(cache)
        batched = jax.tree.map(lambda *xs: jnp.concatenate(xs), *alone)
        token = jnp.asarray([[7], [11]])
        logits, new = decode(model, token, batched, jnp.asarray(lengths))
        for r, n in enumerate(lengths):
            want, want_cache = decode(model, token[r:r + 1], alone[r], jnp.asarray(n))
            np.testing.assert_allclose(logits[r:r + 1], want, atol=1e-5)
            for got_layer, want_layer in zip(new, want_cache, strict=True):
                for key in got_layer:
                    np.testing.assert_allclose(got_layer[key][r:r + 1], want_layer[key],
                                               atol=1e-6)


def test_prefill_equals_decoding_the_prompt_into_the_whole_cache():
    """DecoderFamily.prefill attends over the prompt's own slots, computes only the last
    position's logits and pads the cache after: the logits and every cache array equal one
    decode of the left-padded prompts into a cache of the full length (dense with RoPE and GQA,
    a sliding window, MLA, linear attention; causal and prefix-LM), except in the left padding's
    slots, which no query attends to (what a padding token holds after a layer depends on how
    many masked slots its own all-masked attention row averaged)."""
    from jaxformer.inference.families import model_family
    from jaxformer.models import presets
    from jaxformer.nn.attention import slot_axis
    from tests.nn.test_mla import mla_config

    llama = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=50, max_len=32)
    cases = [(presets.llama(**llama), False), (presets.llama(**llama, sliding_window=4), False),
             (mla_config(), False), (presets.llama(**llama, attention_type="linear"), False),
             (presets.llama(**llama), True)]
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, (2, 7)))
    lengths = jnp.asarray([7, 4])  # row 1: three slots of left padding

    def hide_padding(x: jnp.ndarray, name: str) -> np.ndarray:
        x = np.array(x)
        if name not in ("s", "z"):  # linear attention's running sums have no slots
            index = [1] + [slice(None)] * (x.ndim - 1)
            index[slot_axis(name)] = slice(0, 3)
            x[tuple(index)] = 0
        return x

    for cfg, prefix_lm in cases:
        model = DecoderLM(cfg, rngs=nnx.Rngs(0))
        family = model_family(cfg, prefix_lm=prefix_lm)
        params = nnx.to_pure_dict(nnx.state(model))
        logits, state, slot = family.prefill(params, tokens, lengths, 12)
        offsets = 7 - lengths
        want, want_cache = model.decode(tokens, model.init_cache(2, 12), jnp.asarray(0),
                                        offsets=offsets, prefix_end=7 if prefix_lm else None)
        assert slot == 7
        np.testing.assert_allclose(logits, want[:, -1], atol=1e-5, err_msg=cfg.attention_type)
        for got_layer, want_layer in zip(state["cache"], want_cache, strict=True):
            assert got_layer.keys() == want_layer.keys()
            for name in want_layer:
                got, want_array = (hide_padding(x[name], name) for x in (got_layer, want_layer))
                assert got.shape == want_array.shape, name
                np.testing.assert_allclose(got, want_array, atol=1e-5,
                                           err_msg=f"{cfg.attention_type} {name}")
