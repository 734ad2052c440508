"""Paged KV cache + continuous batching against decoding each request alone with a contiguous
cache: requests joining mid-run, a pool too small for all at once, prefix caching, sampling."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.errors import UserError
from jaxformer.inference.engine import Engine
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.generate import Generator
from jaxformer.inference.processors import SamplingParams
from jaxformer.models import build_model, presets

VOCAB = 40


@functools.cache
def setup():
    cfg = presets.llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                        max_len=32, init_std=0.5)
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(3)))
    family = DecoderFamily(cfg, graphdef)
    return family, params, Generator(family, params)


@functools.cache
def contiguous(n: int) -> list[list[int]]:
    """Each prompt's greedy tokens with a contiguous cache (one batch: the same as alone,
    tests/inference/test_generate.py)."""
    return [g.tokens for g in setup()[2].generate(PROMPTS, n)]


def alone(prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> tuple[list[int], str]:
    tokens = contiguous(n)[PROMPTS.index(prompt)]
    cut = min([tokens.index(s) for s in stop if s in tokens], default=None)
    return (tokens, "length") if cut is None else (tokens[:cut], "stop")


PROMPTS = [[3, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9], [4, 8, 15, 16, 23, 4],
           [30, 1, 2, 3, 4], [7]]


def test_requests_joining_mid_run_equal_each_decoded_alone():
    family, params, _ = setup()
    engine = Engine(family, params, max_batch=3, block_size=4)
    reqs = [engine.submit(p, 7) for p in PROMPTS[:3]]
    engine.step()
    engine.step()
    assert all(len(r.tokens) == 2 for r in reqs)
    stop = alone(PROMPTS[4], 7)[0][3]
    reqs += [engine.submit(p, 7) for p in PROMPTS[3:4]]
    reqs += [engine.submit(PROMPTS[4], 7, stop_tokens=[stop])]
    reqs += [engine.submit(PROMPTS[5], 7)]
    engine.run()
    for r in reqs:
        assert (r.tokens, r.finish_reason) == alone(r.prompt, 7, r.stop_tokens)
    assert reqs[4].finish_reason == "stop"
    # Every block is back in the pool (cached prefix blocks count as available).
    assert engine.allocator.available == engine.allocator.num_blocks - 1
    assert not engine.allocator.refs


def test_a_small_pool_makes_requests_wait_not_fail():
    family, params, _ = setup()
    # 5 usable blocks of 4 slots: each request needs 3 (prompt + 7 new > 8 slots), so one
    # runs at a time although there are 4 rows.
    engine = Engine(family, params, max_batch=4, block_size=4, num_blocks=6,
                    prefix_caching=False)
    reqs = [engine.submit(p, 7) for p in PROMPTS[:4]]
    engine.step()
    assert sum(r.row is not None for r in reqs) == 1 and len(engine.waiting) == 3
    engine.run()
    for r in reqs:
        assert r.tokens == alone(r.prompt, 7)[0]
    assert engine.allocator.available == 5


def test_prefix_cache_reuses_blocks_and_gives_the_same_logits():
    family, params, _ = setup()
    engine = Engine(family, params, max_batch=2, block_size=4)
    system = [11, 12, 13, 14, 15, 16, 17, 18, 19]  # two full blocks + one token
    first = engine.submit(system + [1, 2], 4)
    engine.run()
    second = engine.submit(system + [5], 4)
    engine._admit()
    assert first.cached_tokens == 0 and second.cached_tokens == 8
    logits, _, _ = family.prefill(params, jnp.asarray([second.prompt]),
                                  jnp.asarray([len(second.prompt)]), 16)
    np.testing.assert_allclose(second.logits, logits[0], atol=1e-5)
    engine.run()
    want = setup()[2].generate([second.prompt], 4)[0].tokens
    assert second.tokens == want


def test_sampled_requests_draw_as_alone_with_their_seed():
    family, params, _ = setup()
    engine = Engine(family, params, max_batch=4, block_size=8)
    sampling = SamplingParams(temperature=1.2, top_k=10)
    reqs = [engine.submit(p, 6, sampling, seed=i) for i, p in enumerate(PROMPTS[:4])]
    engine.run()
    for i, r in enumerate(reqs):  # the Generator draws row r of a batch of 1 like this
        assert r.tokens == setup()[2].generate([r.prompt], 6, sampling, seed=i)[0].tokens


def test_requests_that_cannot_be_served_are_refused():
    family, params, _ = setup()
    engine = Engine(family, params, max_batch=2, block_size=4, num_blocks=4)
    with pytest.raises(UserError, match="exceeds the model's context"):
        engine.submit([1] * 30, 5)
    with pytest.raises(UserError, match="cache blocks"):
        engine.submit([1] * 10, 10)
    with pytest.raises(UserError, match="vocabulary"):
        engine.submit([VOCAB], 2)
