"""Batched generation against naive decoding with the full forward pass: prompts of different
lengths (left padding must change nothing), prefix-LM prompts prefilled bidirectionally,
encoder-decoder sources, per-row stop tokens, stop strings, streaming, bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily, Seq2SeqFamily
from jaxformer.inference.generate import Generator
from jaxformer.inference.processors import SamplingParams
from jaxformer.models import build_model, presets

VOCAB = 40
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 6, 2], [11, 4, 4, 9, 1]]


@functools.cache
def model(family: str):
    """Tiny models with large init so that greedy paths differ between rows. Llama: RoPE, GQA,
    no biases; gpt2: learned positions; prefix_lm; t5_v1_0: relative bias; 2017: sinusoids."""
    kw = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_len=32, init_std=0.5)
    if family == "llama":
        kw["n_kv_heads"] = 2
    if family in ("t5_v1_0", "transformer_2017"):
        kw["n_decoder_layers"] = 2
    if family == "linear":  # GPT-2 with linear attention: decodes with a running state
        return build_model(presets.gpt2(attention_type="linear", attention_block=8, **kw),
                           nnx.Rngs(1))
    return build_model(presets.preset(family, **kw), nnx.Rngs(1))


def generator(family: str, **kw) -> Generator:
    m = model(family)
    graphdef, params = nnx.split(m)
    if family in ("t5_v1_0", "transformer_2017"):
        fam = Seq2SeqFamily(m.cfg, graphdef, decoder_start_id=0)
    else:
        fam = DecoderFamily(m.cfg, graphdef, prefix_lm=family == "prefix_lm")
    return Generator(fam, params, **kw)


@functools.cache
def full_forward(family: str):
    """The model's full (uncached, unpadded) forward pass, jitted once: tokens [1, 32] (the
    tail is ignored: every position sees only the ones before it, or the prefix) -> logits."""
    m = model(family)
    graphdef, params = nnx.split(m)

    @jax.jit
    def forward(tokens, prefix_len):
        model_ = nnx.merge(graphdef, params)
        if family in ("t5_v1_0", "transformer_2017"):
            source, target = tokens
            return model_(source, target)
        pos = jnp.arange(tokens.shape[1])[None]
        if family == "prefix_lm":  # the prompt is the bidirectional prefix
            return model_(tokens, pos, prefix=(pos < prefix_len).astype(jnp.int32))
        return model_(tokens, pos)

    return forward


def naive_greedy(family: str, prompt: list[int], n: int) -> list[int]:
    """Argmax of the full forward pass, one token at a time."""
    seq = np.zeros((1, 32), np.int32)
    seq[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        seq[0, i] = int(jnp.argmax(full_forward(family)(jnp.asarray(seq), len(prompt))[0, i - 1]))
    return seq[0, len(prompt):len(prompt) + n].tolist()


def naive_seq2seq(family: str, source: list[int], n: int) -> list[int]:
    src = jnp.asarray([source])
    target = np.zeros((1, 16), np.int32)  # target[0] = 0 is the decoder-start token
    for i in range(n):
        logits = full_forward(family)((src, jnp.asarray(target)), 0)
        target[0, i + 1] = int(jnp.argmax(logits[0, i]))
    return target[0, 1:n + 1].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "prefix_lm", "linear"])
def test_batched_greedy_equals_each_prompt_decoded_alone(family):
    out = generator(family).generate(PROMPTS, 6)
    for prompt, gen in zip(PROMPTS, out, strict=True):
        assert gen.tokens == naive_greedy(family, prompt, 6)
        assert gen.finish_reason == "length"


def test_prefix_lm_decoding_differs_from_causal_decoding():
    """The bidirectional prefill matters: decoding the prefix-LM's prompt causally would give
    other tokens (else the prefix-LM test above would not show anything)."""
    causal = Generator(DecoderFamily(model("prefix_lm").cfg, nnx.graphdef(model("prefix_lm"))),
                       nnx.state(model("prefix_lm")))
    assert [g.tokens for g in causal.generate(PROMPTS, 6)] != \
        [g.tokens for g in generator("prefix_lm").generate(PROMPTS, 6)]


@pytest.mark.parametrize("family", ["t5_v1_0", "transformer_2017"])
def test_seq2seq_batched_greedy_equals_full_forward(family):
    out = generator(family).generate(PROMPTS, 5)
    for source, gen in zip(PROMPTS, out, strict=True):
        assert gen.tokens == naive_seq2seq(family, source, 5)


def test_rows_finish_at_their_own_stop_token():
    gen = generator("llama")
    free = gen.generate(PROMPTS, 8)
    stop = free[1].tokens[2]  # row 1 stops at its third token
    out = gen.generate(PROMPTS, 8, stop_tokens=[stop])
    assert out[1].tokens == free[1].tokens[:2] and out[1].finish_reason == "stop"
    for r in (0, 2):  # the others run on, cut only where they produce that token themselves
        want = free[r].tokens
        cut = want.index(stop) if stop in want else len(want)
        assert out[r].tokens == want[:cut]
        assert out[r].finish_reason == ("stop" if stop in want else "length")


def test_stop_strings_cut_the_text_and_stream_matches_generate():
    def decode(ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)

    gen = generator("llama", decode=decode)
    free = gen.generate(PROMPTS, 12)
    text = free[0].text
    stop = text[4:6]  # occurs in row 0 at character 4 (maybe earlier too)
    out = gen.generate(PROMPTS, 12, stop_strings=[stop])
    assert out[0].text == text[:text.index(stop)] and out[0].finish_reason == "stop"
    assert decode(out[0].tokens).startswith(out[0].text)
    for r in (1, 2):
        t = free[r].text
        assert out[r].text == (t[:t.index(stop)] if stop in t else t)
    chunks = list(gen.stream(PROMPTS, 12, stop_strings=[stop], chunk=3))
    assert len(chunks) > 1
    streamed = [sum((c[r] for c in chunks), []) for r in range(3)]
    assert streamed == [g.tokens for g in out]


def test_sampling_is_reproducible_and_rows_differ_from_greedy():
    gen = generator("gpt2")
    params = SamplingParams(temperature=1.5, top_k=20)
    a = gen.generate(PROMPTS, 10, params, seed=3)
    b = gen.generate(PROMPTS, 10, params, seed=3)
    c = gen.generate(PROMPTS, 10, params, seed=4)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


def test_bad_input_is_a_user_error():
    gen = generator("gpt2")
    with pytest.raises(UserError, match="exceeds the model's context"):
        gen.generate([[1] * 30], 5)
    with pytest.raises(UserError, match="outside the vocabulary"):
        gen.generate([[1, VOCAB]], 2)
    with pytest.raises(UserError, match="stop token"):
        gen.generate([[1, 2]], 2, stop_tokens=[VOCAB + 3])
    with pytest.raises(UserError, match="at least one token"):
        gen.generate([[1, 2], []], 2)
    with pytest.raises(UserError, match="tokenizer"):
        gen.generate([[1, 2]], 2, stop_strings=["x"])
    np.testing.assert_equal(len(gen.generate([[1, 2]], 1)[0].tokens), 1)


def test_a_cached_prompt_prefix_gives_the_logits_of_recomputing_it(tmp_path):
    from jaxformer.inference import prompt_cache

    gen = generator("llama")
    system, user = [5, 9, 2, 7, 1, 3], [3, 8]
    cache = prompt_cache.compute(gen.family, gen.params, system)
    prompt_cache.save(cache, tmp_path / "system.npz")
    loaded = prompt_cache.load(tmp_path / "system.npz", gen.family, gen.params)
    full = gen._start(gen.params, jnp.asarray([system + user]), jnp.asarray([8]), None, 12, 4)
    cached = gen._prepare([user], 4, SamplingParams(temperature=0.0), (), loaded)[0]
    np.testing.assert_allclose(cached.logits, full[0].logits, rtol=1e-5, atol=5e-5)
    for prompt in (user, []):
        assert gen.generate([prompt], 4, prefix=loaded)[0].tokens == \
            gen.generate([system + prompt], 4)[0].tokens
    other = generator("gpt2")
    with pytest.raises(UserError, match="other weights"):
        prompt_cache.load(tmp_path / "system.npz", other.family, other.params)
    with pytest.raises(UserError, match="prefix-LM"):
        prompt_cache.compute(generator("prefix_lm").family, model("prefix_lm"), system)


def test_linear_attention_state_has_no_slot_cache_to_rewind_page_or_store():
    from jaxformer.inference import prompt_cache
    from jaxformer.inference.engine import Engine
    from jaxformer.inference.speculative import speculative_generate

    gen = generator("linear")
    fam, params = gen.family, gen.params
    with pytest.raises(UserError, match="speculative decoding needs a per-slot KV cache"):
        speculative_generate(fam, params, fam, params, PROMPTS[0], max_new_tokens=4)
    with pytest.raises(UserError, match="prompt cache needs a per-slot KV cache"):
        prompt_cache.compute(fam, params, PROMPTS[0])
    with pytest.raises(UserError, match="paged KV cache"):
        Engine(fam, params)
    # The state is a fixed size: 4 heads x 8 x 8 sums per row and layer, whatever the length.
    cache = gen.family._model(params).init_cache(2, 32)
    assert cache[0]["s"].shape == (2, 4, 8, 8) and cache[0]["z"].shape == (2, 4, 8)
