"""LoRA (``lora.rank > 0``): target selection, the merge against naive math, gradients that reach
only the adapters, and whole runs through ``jaxformer.train.loop.train`` from a tiny trained
base: the loss falls, checkpoints hold only the adapters and name the base, a resume repeats
the uninterrupted run bit for bit, and ``convert --to-hf`` writes the merged model (compared
with transformers' GPT-2 on weights merged by numpy here)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.errors import UserError
from jaxformer.models import lora
from jaxformer.models.build import abstract_model, init_params
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run
from jaxformer.train.loop import train
from jaxformer.train.runtime import build_runtime
from tests.command_line import EXPERIMENT, assert_user_error, jaxformer
from tests.corpus import write_corpus
from tests.stored import stored_bytes
from tests.train.helpers import random_batch, run_config, tiny_config


def layout(params) -> dict[str, tuple[int, ...]]:
    return {lora.path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def shapes(cfg):
    return nnx.to_pure_dict(abstract_model(cfg.model)[1])


# --- targets ----------------------------------------------------------------------------------

def test_targets_select_exactly_the_named_kernels():
    cfg = tiny_config("model.n_layers=3")
    p = shapes(cfg)
    layers = range(3)
    assert lora.select_targets(p, ("q",)) == [f"blocks/{i}/attn/w_q" for i in layers]
    assert lora.select_targets(p, ("o", "k")) == sorted(
        [f"blocks/{i}/attn/w_out" for i in layers] + [f"blocks/{i}/attn/w_k" for i in layers])
    assert lora.select_targets(p, ("mlp",)) == sorted(
        f"blocks/{i}/mlp/{w}" for i in layers for w in ("wi", "wo"))
    assert len(lora.select_targets(p, ("all",))) == 3 * 6
    assert lora.select_targets(p, (r"blocks/1/attn/w_(q|v)$",)) == ["blocks/1/attn/w_q",
                                                                   "blocks/1/attn/w_v"]
    # A gated MLP's three kernels; the embedding, norms and biases are never adapted.
    gated = shapes(tiny_config("model.activation=swiglu", "model.use_bias=false"))
    assert lora.select_targets(gated, ("mlp",)) == sorted(
        f"blocks/{i}/mlp/{w}" for i in range(2) for w in ("wi_gate", "wi_up", "wo"))
    with pytest.raises(ConfigError, match="'embed' matches no parameter"):
        lora.select_targets(p, ("embed",))


def test_scanned_layers_get_one_adapter_pair_per_layer():
    cfg = tiny_config("model.scan_layers=true", "lora.rank=3")
    adapters = lora.adapter_shapes(shapes(cfg), cfg.lora)
    got = layout(adapters)
    # w_q [L, D, N, H] = [2, 32, 4, 8]: A [L, D, r], B [L, r, N*H]
    assert got == {"blocks/attn/w_q/a": (2, 32, 3), "blocks/attn/w_q/b": (2, 3, 32),
                   "blocks/attn/w_v/a": (2, 32, 3), "blocks/attn/w_v/b": (2, 3, 32)}


def test_moe_experts_are_not_adapted():
    cfg = tiny_config("model.n_experts=4", "model.experts_top_k=2")
    assert lora.select_targets(shapes(cfg), ("q",))  # attention still is
    with pytest.raises(ConfigError, match="matches no parameter"):
        lora.select_targets(shapes(cfg), ("mlp",))


def test_a_target_matching_nothing_is_a_config_error():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="lora.targets"):
        config_lib.apply_overrides(cfg, ["lora.rank=2", 'lora.targets=["w_nothing"]'])
    with pytest.raises(ConfigError, match="not a regular expression"):
        config_lib.apply_overrides(cfg, ["lora.rank=2", 'lora.targets=["w_q("]'])
    # Off (rank 0), the targets are not looked at.
    config_lib.apply_overrides(cfg, ['lora.targets=["w_nothing"]'])


def test_a_bad_target_on_the_command_line_is_one_error_line(tmp_path):
    run = tmp_path / "run"
    out = jaxformer("train", EXPERIMENT, "--set", "lora.rank=4", "--set",
                    'lora.targets=["q", "attn/w_qq"]', "--run-dir", str(run))
    assert_user_error(out, "lora.targets", "attn/w_qq", "matches no parameter")
    assert not run.exists()


# --- the merge ----------------------------------------------------------------------------------

def random_adapters(params, cfg, seed):
    """Adapters with B != 0 too (trained ones), float32."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                        lora.adapter_shapes(params, cfg.lora))


def test_zero_initialised_adapters_give_exactly_the_base_logits():
    cfg = tiny_config("lora.rank=4", 'lora.targets=["all"]')
    params = init_params(cfg.model, 0)
    adapters = lora.init_adapters(params, cfg.lora, seed=1)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(adapters)
               if x.shape[-2] != cfg.lora.rank)  # A is drawn ...
    merged = lora.merge(params, adapters, lora.scale(cfg.lora))
    graphdef = abstract_model(cfg.model)[0]
    batch = random_batch(cfg, 0)

    @jax.jit
    def logits(p):
        return nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])

    np.testing.assert_array_equal(np.asarray(logits(merged)), np.asarray(logits(params)))


@pytest.mark.parametrize("name", ["blocks/0/attn/w_q", "blocks/1/attn/w_out", "blocks/0/mlp/wo"])
def test_merged_kernel_equals_the_naive_adapter_branch(name):
    """x @ W' == x @ W0 + (alpha / r) * (x @ A) @ B, in float64 numpy, on the kernel's input
    axes flattened (w_out reads [N*H])."""
    cfg = tiny_config("lora.rank=3", "lora.alpha=5", 'lora.targets=["all"]')
    params = init_params(cfg.model, 0)
    adapters = random_adapters(params, cfg, 2)
    merged = lora.merge(params, adapters, lora.scale(cfg.lora))
    get = dict((lora.path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
    got = dict((lora.path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(merged)[0])
    ad = dict((lora.path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0])
    w0 = np.asarray(get[name], np.float64)
    a, b = np.asarray(ad[name + "/a"], np.float64), np.asarray(ad[name + "/b"], np.float64)
    n_in = a.shape[0]
    x = np.random.default_rng(3).normal(size=(5, n_in))
    expected = x @ w0.reshape(n_in, -1) + (5 / 3) * (x @ a) @ b
    actual = x @ np.asarray(got[name], np.float64).reshape(n_in, -1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # Kernels without adapters are the base's (the embedding, a bias).
    np.testing.assert_array_equal(got["embed/table"], get["embed/table"])
    np.testing.assert_array_equal(got["blocks/0/attn/b_q"], get["blocks/0/attn/b_q"])


# --- the train step ----------------------------------------------------------------------------

def test_only_adapters_are_trained_and_hold_optimizer_state():
    cfg = tiny_config("lora.rank=2", "lora.alpha=4", 'lora.targets=["q", "mlp"]',
                      "train.grad_clip=0", "train.warmup_steps=0")
    rt = build_runtime(cfg, jax.devices()[:1])
    base = init_params(cfg.model, 5)
    rt.lora.base = jax.device_put(base, rt.lora.params_sharding)
    state = rt.init_state()
    adapter_layout = layout(lora.adapter_shapes(base, cfg.lora))
    assert layout(state.params) == adapter_layout
    # AdamW's moments: one per adapter leaf (mu and nu), nothing of the base's size.
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(moments) == sorted(2 * list(adapter_layout.values()))
    before = jax.tree.map(np.asarray, state.params)
    batch = jax.device_put(random_batch(cfg, 0), rt.batch_sharding)

    # The gradient of B at B = 0 is (alpha/r) A^T dL/dW (chain rule through W0 + s A B),
    # with dL/dW the full model's gradient: checked against jax.grad of the plain loss.
    from jaxformer.objectives import get_objective
    from jaxformer.train.step import make_loss_sums

    loss_sums = make_loss_sums(rt.graphdef, get_objective("causal").logits)
    full_grads = jax.jit(jax.grad(lambda p: loss_sums(p, batch)["loss_sum"]))(base)
    n = float(np.asarray(batch["loss_weights"]).sum())
    new_state, metrics = rt.train_step(state, batch)
    assert layout(new_state.params) == adapter_layout
    g_w = np.asarray(full_grads["blocks"][0]["attn"]["w_q"]).reshape(32, -1) / n
    a = before["blocks"][0]["attn"]["w_q"]["a"]
    expected_gb = 2.0 * a.T @ g_w
    # Adam's first update moves each entry by -lr * sign(g) (bias-corrected m/sqrt(v) = g/|g|),
    # and weight decay of a zero B is zero: the update's sign is the gradient's.
    moved = new_state.params["blocks"][0]["attn"]["w_q"]["b"] - before["blocks"][0]["attn"][
        "w_q"]["b"]
    big = np.abs(expected_gb) > 1e-3 * np.abs(expected_gb).max()
    assert big.sum() > 10
    np.testing.assert_array_equal(np.sign(moved[big]), -np.sign(expected_gb[big]))
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(np.sqrt(sum(
        (np.asarray(g) ** 2).sum() for g in jax.tree.leaves(jax.jit(jax.grad(
            lambda ad: loss_sums(lora.merge(base, ad, 2.0), batch)["loss_sum"]))(before))))) / n,
        rtol=1e-4)


def test_grad_accumulation_gives_the_same_step():
    """Two micro-batches (each merging and pulling its gradient back to the adapters) give the
    whole batch's loss and update."""
    steps = {}
    for accum in (1, 2):
        cfg = tiny_config("lora.rank=2", 'lora.targets=["q", "mlp"]', "train.warmup_steps=0",
                          f"train.grad_accum={accum}")
        rt = build_runtime(cfg, jax.devices()[:1])
        rt.lora.base = jax.device_put(init_params(cfg.model, 5), rt.lora.params_sharding)
        state = rt.init_state()
        batch = jax.device_put(random_batch(cfg, 0), rt.batch_sharding)
        for _ in range(2):  # the second step moves A too (B != 0 after the first)
            state, metrics = rt.train_step(state, batch)
        steps[accum] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    np.testing.assert_allclose(steps[2][0], steps[1][0], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(steps[2][1]), jax.tree.leaves(steps[1][1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_flops_per_token_leave_out_the_frozen_weights_gradients(dropout):
    """Full training costs 6 per matmul weight entry and token (forward 2, backward 4); LoRA's
    frozen weights need no weight gradient (2 of the 6): merged, only the targeted kernels'
    weight gradients run; as branches (dropout), none of the base's, plus 6 per adapter entry.
    The model line counts the model's parameters, not the adapters the state holds."""
    cfg = tiny_config("lora.rank=2", 'lora.targets=["all"]', f"lora.dropout={dropout}")
    rt = build_runtime(cfg, jax.devices()[:1])
    layers, d, f, v, t = 2, 32, 4 * 32, 64, 16
    targeted = layers * (4 * d * d + 2 * d * f)  # q, k, v, o and the MLP's wi, wo
    n = targeted + v * d  # + the un-embedding
    attention = 6 * layers * t * d
    adapters = layers * (4 * 2 * (d + d) + 2 * (d + f) + 2 * (f + d))
    fpt, formula = rt.flops_per_token()
    if dropout:
        assert formula == "4N + 6N_a + 6LTNH"
        assert fpt == 4 * n + 6 * adapters + attention
    else:
        assert formula == "4N + 2N_t + 6LTNH"
        assert fpt == 4 * n + 2 * targeted + attention
    full = build_runtime(tiny_config(), jax.devices()[:1])
    assert full.flops_per_token() == (6 * n + attention, "6N + 6LTNH")
    state = rt.abstract_state()
    assert rt.n_params(state) == full.n_params(full.abstract_state()) > 10 * lora.count(
        state.params)


# --- whole runs ----------------------------------------------------------------------------------

def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT-2-layout decoder trained for 40 steps, the corpus it trained on, and its
    result (its validation loss)."""
    tmp = tmp_path_factory.mktemp("lora")
    corpus = write_corpus(tmp / "corpus", n_docs=60)
    cfg = run_config(str(corpus), "train.steps=40", "train.lr=1e-2", "checkpoint.every=40",
                     "eval.every=40", "eval.batches=4", "log.every=20")
    return tmp, corpus, train(cfg, tmp / "base", echo=quiet, progress=False)


def lora_config(tmp, corpus, *extra: str):
    return run_config(str(corpus), f"train.init_from={tmp / 'base'}", "lora.rank=4",
                      "lora.alpha=8", 'lora.targets=["all"]', "train.steps=24", "train.lr=2e-2",
                      "checkpoint.every=12", "eval.every=24", "eval.batches=4",
                      "log.every=12", *extra)


@pytest.fixture(scope="module")
def lora_run(base):
    """A 24-step LoRA run from the base -> (its dir, result, config, the lines it printed)."""
    tmp, corpus, _ = base
    lines: list[str] = []
    cfg = lora_config(tmp, corpus)
    result = train(cfg, tmp / "lora", echo=lines.append, progress=False)
    return tmp / "lora", result, cfg, lines


def test_a_lora_run_learns_and_checkpoints_only_its_adapters(base, lora_run):
    tmp, _, base_result = base
    run, result, cfg, lines = lora_run
    # On the base's own validation split, the adapters lower the base's loss.
    assert result.evals[24] < base_result.evals[40] - 0.05, (result.evals, base_result.evals)
    info = next(line for line in lines if line.startswith("lora: rank"))
    assert "trainable parameters" in info and "full fine-tuning" in info
    n_model = sum(x.size for x in jax.tree.leaves(init_params(cfg.model, 0)))
    model_line = next(line for line in lines if line.startswith("model: "))
    assert model_line.startswith(f"model: {n_model:,} parameters, ") and "(4N + 2N_t + 6LTNH)" \
        in model_line, model_line
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, 3, create=False)
    meta = ckpt.read_meta(24)
    ckpt.close()
    base_params = init_params(cfg.model, 0)
    assert set(meta["param_layout"]) == {
        f"{k}/{ab}" for k in lora.select_targets(base_params, ("all",)) for ab in "ab"}
    assert meta["config"]["train"]["init_from"] == str(tmp / "base")
    record = json.loads((run / "lora_base.json").read_text())
    assert record == {"init_from": str((tmp / "base").absolute()), "step": 40}

    # What is stored (tests/stored.py): the adapters are ~13% of this tiny model's weights
    # (rank 4 of width 32), and the whole state item (parameters, optimizer moments, step)
    # shrinks with them.
    ckpt = Checkpointer(tmp / "base" / rundir.CHECKPOINT_DIR, 3, create=False)
    base_meta = ckpt.read_meta(40)
    ckpt.close()

    def scalars(layout):
        return sum(int(np.prod(s)) for s in layout.values())

    assert scalars(meta["param_layout"]) < 0.2 * scalars(base_meta["param_layout"])
    lora_bytes = stored_bytes(run / rundir.CHECKPOINT_DIR / "24" / "state")
    base_bytes = stored_bytes(tmp / "base" / rundir.CHECKPOINT_DIR / "40" / "state")
    assert 4 * scalars(meta["param_layout"]) < lora_bytes < 0.2 * base_bytes, (lora_bytes,
                                                                               base_bytes)


def test_resume_repeats_the_uninterrupted_run_bitwise(base, lora_run, tmp_path):
    tmp, corpus, _ = base
    run, whole, cfg, _ = lora_run
    train(cfg, tmp_path / "split", echo=quiet, progress=False, stop_at=7)
    resumed = train(cfg, tmp_path / "split", echo=quiet, progress=False)
    assert resumed.start_step == 7
    assert [whole.losses[s] for s in range(8, 25)] == [resumed.losses[s] for s in range(8, 25)]
    _, a = load_run(run)
    _, b = load_run(tmp_path / "split")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_writes_the_merged_model(base, lora_run, tmp_path):
    """``convert --to-hf`` of a LoRA run == transformers GPT-2 on base + adapters merged by
    numpy here from the two checkpoints (not by models.lora.merge)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tmp = base[0]
    run, _, cfg, _ = lora_run
    out = jaxformer("convert", "--to-hf", str(run), "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-2000:]

    _, base_params = load_run(tmp / "base")
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, 3, create=False)
    adapters = ckpt.restore_params(lora.adapter_shapes(base_params, cfg.lora))
    ckpt.close()
    flat = {lora.path_name(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    assert any(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("/b"))  # trained

    def naive(path, w):
        name = lora.path_name(path)
        if name + "/a" not in flat:
            return w
        w = np.asarray(w, np.float64)
        a, b = flat[name + "/a"], flat[name + "/b"]
        return jnp.asarray(w + (8 / 4) * (a @ b).reshape(w.shape), jnp.float32)

    merged = jax.tree_util.tree_map_with_path(naive, base_params)
    batch = random_batch(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, batch_size=2)), 0, pad_tail=0)
    ids = batch["inputs"][:1]
    graphdef = abstract_model(cfg.model)[0]
    ours = nnx.merge(graphdef, merged)(ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(np.asarray(ids, np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=1e-4)
    # ... and not the base model's.
    plain = nnx.merge(graphdef, base_params)(ids, np.arange(ids.shape[1])[None],
                                             np.ones_like(ids))
    assert np.abs(np.asarray(plain) - theirs).max() > 1e-2


def test_a_base_lacking_parameters_of_the_model_is_refused(base, tmp_path):
    """Parameters the base has not got (here the MTP module of model.mtp_heads=1) would stay at
    their random init under LoRA: one error naming them, before the run dir is written."""
    tmp, corpus, _ = base
    cfg = lora_config(tmp, corpus, "model.mtp_heads=1")
    with pytest.raises(UserError, match=r"lacks parameters of the model \(new \(initialized\): "
                                        r"mtp.*\); LoRA trains only adapters"):
        train(cfg, tmp_path / "run", echo=quiet, progress=False)
    assert not (tmp_path / "run").exists()


def test_lora_dropout_run_learns_and_resumes_bitwise(base, lora_run, tmp_path):
    """``lora.dropout=0.2`` (adapters as branches, their inputs dropped): the first step's loss
    is the merged run's (B = 0: no branch output to drop), later ones differ, the validation
    loss (no dropout) still falls below the base's, and a resume repeats the run bitwise."""
    tmp, corpus, base_result = base
    _, plain, _, _ = lora_run
    cfg = lora_config(tmp, corpus, "lora.dropout=0.2")
    whole = train(cfg, tmp_path / "whole", echo=quiet, progress=False)
    np.testing.assert_allclose(whole.losses[1], plain.losses[1], rtol=1e-6)
    assert all(whole.losses[s] != plain.losses[s] for s in range(3, 25))
    assert whole.evals[24] < base_result.evals[40] - 0.05, (whole.evals, base_result.evals)
    train(cfg, tmp_path / "split", echo=quiet, progress=False, stop_at=20)
    resumed = train(cfg, tmp_path / "split", echo=quiet, progress=False)
    assert resumed.start_step == 20
    assert [whole.losses[s] for s in range(21, 25)] == [resumed.losses[s] for s in range(21, 25)]
