"""Multi-token prediction (``model.mtp_heads``): the MTP loss against a naive reference built
from the decode path one position at a time (with document-boundary and padding masking), a
short real training run in which depth 1 learns, the default adding no parameter, greedy
self-speculative decoding equal to plain greedy decoding with the acceptance the MTP modules'
own predictions imply, and config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

import jaxformer.objectives  # noqa: F401 - registers the objectives
from jaxformer.config import Config, ConfigError, apply_overrides
from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.generate import Generator
from jaxformer.inference.mtp_speculative import mtp_generate
from jaxformer.models import build_model
from jaxformer.objectives.registry import get_objective
from jaxformer.train.flops import flops_per_token, matmul_params
from jaxformer.train.loop import train
from jaxformer.train.step import make_loss_sums
from tests.corpus import write_corpus
from tests.train.helpers import random_batch, run_config, tiny_config

WEIGHT = 0.3


def _paths(state: nnx.State) -> dict[tuple, np.ndarray]:
    return {tuple(str(k) for k in path): np.asarray(v) for path, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}


def test_default_adds_no_parameter_and_mtp_leaves_the_main_weights_alone():
    plain = _paths(nnx.state(build_model(tiny_config().model, nnx.Rngs(0)), nnx.Param))
    mtp = _paths(nnx.state(build_model(tiny_config("model.mtp_heads=2").model, nnx.Rngs(0)),
                           nnx.Param))
    assert tiny_config().model.mtp_heads == 0
    assert not any("mtp" in p for path in plain for p in path)
    extra = set(mtp) - set(plain)
    assert set(plain) <= set(mtp) and extra
    assert {path[0] for path in extra} == {"['mtp']"}
    assert {path[1] for path in extra} == {"[0]", "[1]"}
    for path, value in plain.items():  # created after the main model: same initial weights
        np.testing.assert_array_equal(value, mtp[path])
    # FLOP accounting: each depth's matrices (projection, attention, MLP) and the shared
    # un-embedding once more per depth; one more attention layer per depth.
    weights = sum(mtp[p].size for p in extra if p[-1] == "['proj']" or p[-1][2] == "w")
    m0, m2 = tiny_config().model, tiny_config("model.mtp_heads=2").model
    assert matmul_params(m2) - matmul_params(m0) == weights + 2 * m0.vocab_size * m0.d_model
    assert (flops_per_token(m2, 16) - 6 * matmul_params(m2)
            == 2 * (flops_per_token(m0, 16) - 6 * matmul_params(m0)))  # 2 layers + 2 depths


def _naive_mtp_logits(model, inputs: np.ndarray, seg: np.ndarray, n: int) -> np.ndarray:
    """[n, B, T, V]: each document of each row decoded on its own, one position at a time,
    with the decode path (cache and decode mask, not the training path's causal/segment
    masks); depth k at position i gets depth k-1's hidden state at i and the row's token
    i + k (0 past the row's end), as the model was trained."""
    b, t = inputs.shape

    @jax.jit
    def position(tok, nxt, cache, mtp_cache, i):
        logits, cache, h = model.decode(tok[None, None], cache, i, return_hidden=True)
        out, new_mtp = [], []
        for k in range(1, n + 1):
            lk, h, c = model.mtp_decode(k, h, nxt[k - 1][None, None], mtp_cache[k - 1], i)
            out.append(lk[0, 0])
            new_mtp.append(c)
        return jnp.stack(out), cache, new_mtp

    padded = np.concatenate([inputs, np.zeros((b, n), inputs.dtype)], axis=1)
    result = np.zeros((n, b, t, model.cfg.vocab_size), np.float32)
    for row in range(b):
        for doc in sorted(set(seg[row]) - {0}):
            cols = np.flatnonzero(seg[row] == doc)
            cache, mtp_cache = model.init_cache(1, t), model.init_mtp_cache(1, t)
            for slot, col in enumerate(cols):
                nxt = jnp.asarray(padded[row, col + 1:col + 1 + n])
                logits, cache, mtp_cache = position(jnp.asarray(inputs[row, col]), nxt, cache,
                                                    mtp_cache, jnp.asarray(slot, jnp.int32))
                result[:, row, col] = np.asarray(logits)
    return result


def test_mtp_loss_matches_a_naive_reference_with_document_masking():
    n = 2
    cfg = tiny_config(f"model.mtp_heads={n}", "train.batch_size=2", "model.n_layers=1",
                      "model.init_std=0.3")
    model = build_model(cfg.model, nnx.Rngs(3))
    batch = random_batch(cfg, 1)  # two documents per row (weight 0 on the first's last
    # target), then 3 positions of padding
    graphdef, params = nnx.split(model)
    sums = jax.jit(make_loss_sums(graphdef, get_objective("causal").logits,
                                  mtp_weight=WEIGHT))(params, batch)

    logits = _naive_mtp_logits(model, batch["inputs"], batch["segment_ids"], n)
    targets, weights, seg = batch["targets"], batch["loss_weights"], batch["segment_ids"]
    b, t = targets.shape
    want, counted = np.zeros(n), np.zeros(n, int)
    for k in range(1, n + 1):
        for row in range(b):
            for i in range(t):
                j = i + k  # depth k at i predicts the target of position i + k
                if j >= t or seg[row, j] != seg[row, i] or weights[row, j] == 0:
                    continue
                z = logits[k - 1, row, i].astype(np.float64)
                nll = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[targets[row, j]]
                want[k - 1] += weights[row, j] * nll
                counted[k - 1] += 1
    # Per row: 16 positions, documents 0-7 and 8-12 (13-15 padding), position 7's target
    # weighted 0: depth 1 keeps 6 + 4 targets, depth 2 keeps 5 + 3.
    assert counted.tolist() == [10 * b, 8 * b]
    for k in range(1, n + 1):
        np.testing.assert_allclose(float(sums[f"mtp_loss_{k}_sum"]), want[k - 1], rtol=2e-5)
    np.testing.assert_allclose(float(sums["mtp_loss_sum"]), want.mean(), rtol=2e-5)
    # nll_sum is the main next-token loss alone (no label smoothing or z-loss here)
    np.testing.assert_allclose(float(sums["loss_sum"]),
                               float(sums["nll_sum"]) + WEIGHT * want.mean(), rtol=2e-5)
    assert float(sums["weight_sum"]) == float(weights.sum())  # the main count divides all


class _Collect:
    """A hook keeping every step's metrics and, at the end, the parameters."""

    def __init__(self, end: int):
        self.end, self.metrics, self.params = end, [], None

    def after_step(self, run, step, metrics) -> None:
        self.metrics.append({k: float(v) for k, v in metrics.items()})
        if step == self.end:
            self.params = run.state.params


STEPS = 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny causal model with two MTP depths, trained through the real loop."""
    root = tmp_path_factory.mktemp("mtp")
    corpus = str(write_corpus(root / "corpus"))
    cfg = run_config(corpus, "model.mtp_heads=2", f"train.steps={STEPS}", "train.lr=1e-2",
                     "train.warmup_steps=5", "eval.every=1000", "checkpoint.every=1000",
                     "log.every=1000", "eval.batches=1")
    hook = _Collect(STEPS)
    train(cfg, root / "run", progress=False, echo=lambda _: None, hooks=[hook])
    hook.run_dir = root / "run"
    tokenizer = Tokenizer.from_file(str(root / "run" / "tokenizer.json"))
    return cfg, hook, tokenizer


def test_training_lowers_the_mtp_loss(trained):
    cfg, hook, _ = trained
    first, last = hook.metrics[0], hook.metrics[-5:]
    depth1 = np.mean([m["mtp_loss_1"] for m in last])
    print(f"mtp_loss_1 {first['mtp_loss_1']:.3f} -> {depth1:.3f}; mtp_loss_2 "
          f"{first['mtp_loss_2']:.3f} -> {np.mean([m['mtp_loss_2'] for m in last]):.3f}; "
          f"nll {first['nll']:.3f} -> {np.mean([m['nll'] for m in last]):.3f}")
    assert first["mtp_loss_1"] > 4.0  # about log(vocab) at init
    assert depth1 < 0.6 * first["mtp_loss_1"]
    for m in hook.metrics:  # the logged loss is the main loss plus the weighted MTP mean
        np.testing.assert_allclose(m["loss"], m["nll"] + cfg.objective.mtp_weight *
                                   m["mtp_loss"], rtol=1e-5)
        np.testing.assert_allclose(m["mtp_loss"], (m["mtp_loss_1"] + m["mtp_loss_2"]) / 2,
                                   rtol=1e-5)


def _expected_stats(model, prompt: list[int], tokens: list[int], n: int, max_new: int):
    """(rounds, accepted) that the MTP modules' training-path predictions imply: a round at
    length L accepts proposal i while each depth i's argmax at position L - 2 over the greedy
    sequence is that sequence's token L - 1 + i (with d_1 .. d_{i-1} accepted, depth i saw
    exactly the tokens the training path sees)."""
    seq = np.asarray(prompt + tokens)
    _, mtp_logits = model(jnp.asarray(seq)[None], jnp.arange(len(seq))[None], return_mtp=True)
    guess = np.asarray(jnp.argmax(mtp_logits[:, 0], axis=-1))  # [n, len]
    length, rounds, accepted, p = len(prompt) + 1, 0, 0, len(prompt)
    while length - p < max_new:
        m = 0
        while m < n and guess[m, length - 2] == seq[length + m]:
            m += 1
        rounds, accepted, length = rounds + 1, accepted + m, length + m + 1
    return rounds, accepted


def test_self_speculative_decoding_is_plain_greedy_and_accepts_proposals(trained):
    cfg, hook, tokenizer = trained
    model = build_model(cfg.model, nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    nnx.update(model, hook.params)
    family = DecoderFamily(cfg.model, graphdef)
    prompt = tokenizer.encode('"""Module 7."""\n\ndef').ids
    max_new = cfg.model.max_len - len(prompt) - 4  # room for 3 more to check the rounds
    # Plain greedy decoding, 3 tokens longer (one compiled loop for both uses below): its
    # first max_new tokens are what generate([prompt], max_new) returns.
    longer = Generator(family, hook.params).generate([prompt], max_new + 3)[0].tokens
    want = longer[:max_new]
    got, stats = mtp_generate(family, hook.params, prompt, max_new_tokens=max_new)
    print(f"prompt {len(prompt)} tokens, {max_new} new: {stats}, "
          f"{stats.tokens_per_target_call:.2f} tokens per main-model call")
    assert got == want
    assert stats.accepted > 0
    assert (stats.rounds, stats.accepted) == _expected_stats(
        model, prompt, longer, cfg.model.mtp_heads, max_new)
    # A stop token mid-way (no recompilation: the stop set is an argument of both loops).
    stop = want[len(want) // 2]
    stopped = Generator(family, hook.params).generate([prompt], max_new + 3,
                                                      stop_tokens=[stop])[0].tokens
    got, _ = mtp_generate(family, hook.params, prompt, max_new_tokens=max_new,
                          stop_tokens=[stop])
    assert got == stopped == want[:want.index(stop)]


def test_sample_mtp_prints_the_greedy_text(trained, capsys):
    """`jaxformer sample --mtp` (through the command, in process) prints what greedy decoding
    prints, and reports how many proposals the MTP modules got accepted."""
    from jaxformer.cli import main

    _, hook, _ = trained
    args = ["sample", str(hook.run_dir), "--prompt", '"""Module 7."""', "--max-new-tokens",
            "12"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--mtp"]) == 0
    out = capsys.readouterr()
    assert out.out == greedy and "MTP proposals accepted" in out.err
    assert main([*args, "--mtp", "--temperature", "0.7"]) == 2
    assert "--mtp decodes greedily" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, match", [
    (["model.arch=encoder", "objective.kind=masked_lm", "model.mtp_heads=1"],
     "model.mtp_heads=1 .*needs model.arch='decoder' and objective.kind='causal'"),
    (["objective.kind=prefix_lm", "model.mtp_heads=2"], "objective.kind='causal'"),
    (["model.mtp_heads=-1"], "bad value for model.mtp_heads: -1 must be >= 0"),
    (["objective.mtp_weight=-0.5"], "bad value for objective.mtp_weight: -0.5 must be >= 0"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        apply_overrides(Config(), overrides)
    assert "\n" not in str(e.value)


def test_decoding_without_mtp_modules_is_a_user_error():
    cfg = tiny_config()
    graphdef, params = nnx.split(build_model(cfg.model, nnx.Rngs(0)))
    with pytest.raises(UserError, match="model.mtp_heads > 0"):
        mtp_generate(DecoderFamily(cfg.model, graphdef), params, [1, 2], max_new_tokens=4)
