"""Knowledge distillation (``train.teacher``): the soft-target KL against numpy, the loss at
alpha = 1 against the plain cross-entropy, a teacher equal to the student, no gradient into
the teacher, gradient accumulation, the checks on the teacher (another vocabulary: one error
line, nothing written), and tiny runs through the real loop (the KL falls; a resume repeats
the uninterrupted run bit for bit)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.objectives import get_objective
from jaxformer.objectives.distillation import distillation_kl_sums
from jaxformer.parallel.sharding import PRESET_RULES, param_shardings
from jaxformer.runs import rundir
from jaxformer.runs.restore import load_run
from jaxformer.train.loop import train
from jaxformer.train.runtime import build_runtime
from jaxformer.train.step import make_loss_sums, make_train_step
from jaxformer.train.teacher import Teacher
from tests.command_line import assert_user_error, jaxformer, snapshot
from tests.corpus import write_corpus
from tests.train.helpers import random_batch, run_config, tiny_config

CAUSAL = get_objective("causal").logits


def naive_kl(student: np.ndarray, teacher: np.ndarray, weights: np.ndarray, t: float) -> float:
    """sum over tokens of weights * KL(softmax(teacher/t) || softmax(student/t)), float64."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher.astype(np.float64) / t), softmax(student.astype(np.float64) / t)
    return float(np.sum(weights * np.sum(p * np.log(p / q), axis=-1)))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_against_numpy(temperature):
    rng = np.random.default_rng(0)
    s = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    t = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    w = (rng.random((3, 5)) > 0.3).astype(np.float32)  # padding: weight 0
    got = float(distillation_kl_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w),
                                     temperature)["distill_kl_sum"])
    want = naive_kl(s, t, w, temperature)
    assert want > 1.0  # far from 0: the comparison tells something
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Padding does not count: changing the logits of weight-0 tokens changes nothing.
    s2 = np.where(w[..., None] == 0, 100.0, s).astype(np.float32)
    again = distillation_kl_sums(jnp.asarray(s2), jnp.asarray(t), jnp.asarray(w), temperature)
    assert float(again["distill_kl_sum"]) == pytest.approx(got, rel=1e-6)


def tiny_teacher(model_cfg, alpha: float, temperature: float = 2.0) -> Teacher:
    """A Teacher over ``model_cfg`` on one device (no run dir: the tests pass its weights)."""
    graphdef, abstract = abstract_model(model_cfg)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return Teacher(run_dir=None, cfg=None, graphdef=graphdef, forward=CAUSAL,
                   params_sharding=param_shardings(abstract, mesh, PRESET_RULES["data"]),
                   alpha=alpha, temperature=temperature)


@pytest.fixture(scope="module")
def student():
    """A tiny decoder's config, runtime and batch, and a teacher of another width whose
    weights are scaled up (sharper predictions than a fresh init's near-uniform ones)."""
    cfg = tiny_config("model.n_layers=1")
    rt = build_runtime(cfg, jax.devices()[:1])
    teacher_model = dataclasses.replace(cfg.model, d_model=48)
    fresh = build_runtime(dataclasses.replace(cfg, model=teacher_model),
                          jax.devices()[:1]).init_state().params
    teacher_params = jax.tree.map(lambda x: 4.0 * x, fresh)
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, 0).items()}
    return cfg, rt, teacher_model, teacher_params, batch


def test_alpha_one_is_the_plain_cross_entropy(student):
    cfg, rt, teacher_model, teacher_params, batch = student
    params = rt.init_state().params
    plain = make_loss_sums(rt.graphdef, CAUSAL)
    distilled = make_loss_sums(rt.graphdef, CAUSAL,
                               teacher=tiny_teacher(teacher_model, alpha=1.0))

    @jax.jit
    def both(p, tp):
        def loss(fn, *extra):
            return lambda q: (fn(q, batch, None, *extra)["loss_sum"], fn(q, batch, None, *extra))

        return (jax.grad(loss(plain), has_aux=True)(p),
                jax.grad(loss(distilled, tp), has_aux=True)(p))

    (g_want, want), (g_got, got) = both(params, teacher_params)
    assert float(got["distill_kl_sum"]) > 1.0  # the teacher disagrees; alpha=1 ignores it
    assert float(got["loss_sum"]) == float(want["loss_sum"])
    for g, w in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-9)


def test_no_gradient_reaches_the_teacher(student):
    cfg, rt, teacher_model, teacher_params, batch = student
    params = rt.init_state().params
    loss_sums = make_loss_sums(rt.graphdef, CAUSAL, teacher=tiny_teacher(teacher_model, 0.3))
    g_student, g_teacher = jax.jit(jax.grad(
        lambda p, tp: loss_sums(p, batch, None, tp)["loss_sum"], argnums=(0, 1)))(
        params, teacher_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    # ... while the same loss does depend on the student (the check above is not vacuous).
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student)) > 1e-3


def distill_step(cfg, teacher_model, alpha=0.5, temperature=2.0):
    """A runtime whose step distils from ``teacher_model`` (weights passed per call)."""
    rt = build_runtime(cfg, jax.devices()[:1])
    teacher = tiny_teacher(teacher_model, alpha, temperature)
    step = make_train_step(rt.graphdef, rt.tx, rt.schedule, cfg.train.grad_accum,
                           rt.state_sharding, rt.batch_sharding,
                           jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec()),
                           forward=CAUSAL, teacher=teacher)
    return rt, step


def test_a_teacher_equal_to_the_student_gives_kl_zero(student):
    cfg, *_, batch = student
    rt, step = distill_step(cfg, cfg.model, alpha=0.25)
    state = rt.init_state()
    teacher_params = jax.tree.map(jnp.copy, state.params)  # the student's own weights
    before = jax.tree.map(np.asarray, teacher_params)
    new_state, m = step(state, batch, teacher_params)
    assert abs(float(m["distill_kl"])) < 1e-6
    # loss = alpha * CE + 0 (the CE is the nll without label smoothing), nll near log V
    assert float(m["nll"]) == pytest.approx(np.log(cfg.model.vocab_size), rel=0.05)
    assert float(m["loss"]) == pytest.approx(0.25 * float(m["nll"]), rel=1e-6)
    # The teacher is an argument, not state: the step leaves it as it was and the new state
    # holds the student's parameters only.
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher_params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (jax.tree.structure(new_state.params)
            == jax.tree.structure(jax.tree.map(np.asarray, before)))
    assert int(new_state.step) == 1


def test_grad_accumulation_gives_the_same_loss(student):
    cfg, _, teacher_model, teacher_params, batch = student
    out = {}
    for accum in (1, 2):
        c = config_lib.apply_overrides(cfg, [f"train.grad_accum={accum}"])
        rt, step = distill_step(c, teacher_model, alpha=0.3, temperature=3.0)
        _, m = step(rt.init_state(), batch, teacher_params)
        out[accum] = {k: float(m[k]) for k in ("loss", "distill_kl", "nll", "grad_norm")}
    assert out[1]["distill_kl"] > 0.1
    for k in out[1]:
        assert out[2][k] == pytest.approx(out[1][k], rel=2e-5), k


# --- through the loop: a tiny teacher run dir -------------------------------------------------

STUDENT = ["model.n_layers=1", "model.d_model=32", "train.steps=12", "log.every=1",
           "eval.every=6", "checkpoint.every=6", "train.lr=1e-2", "train.batch_size=8"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher trained for 30 steps on a tiny corpus (2 layers, d_model 48)."""
    tmp = tmp_path_factory.mktemp("distill")
    corpus = write_corpus(tmp / "corpus", n_docs=40)
    cfg = run_config(corpus, "model.d_model=48", "train.steps=30", "checkpoint.every=30",
                     "eval.every=30", "train.lr=1e-2", "train.batch_size=8")
    train(cfg, tmp / "teacher", progress=False, echo=lambda s: None)
    return tmp, corpus


class Collect:
    """A hook that keeps each step's metrics on the host."""

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}

    def after_step(self, run, step, metrics):
        self.metrics[step] = {k: float(v) for k, v in jax.device_get(metrics).items()}


def test_distillation_run_lowers_the_kl_and_resumes_exactly(teacher_run, tmp_path):
    tmp, corpus = teacher_run
    cfg = run_config(corpus, *STUDENT, f"train.teacher={tmp / 'teacher'}")
    seen = Collect()
    lines: list[str] = []
    result = train(cfg, tmp_path / "a", progress=False, echo=lines.append, hooks=[seen])
    assert any(line.startswith(f"teacher: {tmp / 'teacher'}") for line in lines)
    kl = [seen.metrics[s]["distill_kl"] for s in sorted(seen.metrics)]
    assert kl[0] > 0.05 and np.mean(kl[-3:]) < 0.7 * np.mean(kl[:3]), kl
    # Logged, and the validation loss is the student's plain cross-entropy (not the mix).
    assert any("distill_kl" in line for line in lines if line.startswith("step"))
    assert result.evals[12] == pytest.approx(result.eval_metrics[12]["loss"])
    # Interrupted at step 6 and resumed (the teacher reloaded): the same weights, bit for bit.
    train(cfg, tmp_path / "b", progress=False, echo=lambda s: None, stop_at=6)
    train(cfg, tmp_path / "b", progress=False, echo=lambda s: None)
    _, a = load_run(tmp_path / "a")
    _, b = load_run(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_teacher_with_another_vocabulary_size_is_refused(teacher_run, tmp_path):
    tmp, corpus = teacher_run
    cfg = run_config(corpus, *STUDENT, "model.vocab_size=320",
                     f"train.teacher={tmp / 'teacher'}")
    with pytest.raises(UserError, match="another vocabulary: model.vocab_size=300"):
        train(cfg, tmp_path / "s", progress=False, echo=lambda s: None)
    assert not (tmp_path / "s").exists()


def test_cli_refuses_a_teacher_with_another_tokenizer(teacher_run, tmp_path):
    """Same vocab_size, but the student's tokenizer is trained on other text: other ids."""
    tmp, _ = teacher_run
    other = write_corpus(tmp_path / "other", n_docs=40, seed=7)
    (other / "extra.py").write_text("zebra_quux = 'xylophone' * 12345\n" * 20)
    run_dir = tmp_path / "student"
    overrides = [f"data.source={other}", f"train.teacher={tmp / 'teacher'}",
                 "model.vocab_size=300", "model.n_layers=1",
                 "model.d_model=32", "model.n_heads=2", "model.max_len=32", "data.seq_len=32",
                 "train.batch_size=4", "train.steps=2", "train.warmup_steps=0",
                 "sample.count=0"]
    before = snapshot(tmp / "teacher")
    out = jaxformer("train", "experiments/gpt_tiny.py", "--run-dir", str(run_dir),
                    "--no-progress", *[a for o in overrides for a in ("--set", o)])
    assert_user_error(out, "train.teacher", "another vocabulary")
    assert not run_dir.exists()
    assert snapshot(tmp / "teacher") == before


def test_classifier_teacher_and_objective_mismatch_are_refused(teacher_run, tmp_path):
    tmp, corpus = teacher_run
    cfg = run_config(corpus, *STUDENT, "objective.kind=prefix_lm",
                     f"train.teacher={tmp / 'teacher'}")
    with pytest.raises(UserError, match="objective.kind='causal'"):
        build_runtime(cfg, jax.devices()[:1])
    missing = run_config(corpus, f"train.teacher={tmp / 'nowhere'}")
    with pytest.raises(UserError, match="train.teacher: .*nowhere"):
        build_runtime(missing, jax.devices()[:1])
    assert (tmp / "teacher" / rundir.CONFIG_FILE).is_file()


def test_a_distillation_step_compiles_for_a_tpu_slice(teacher_run, capsys):
    """`jaxformer compile` lowers the step with the teacher's weights as shapes (no weights
    are loaded onto the compile-only devices)."""
    tmp, corpus = teacher_run
    overrides = [f"data.source={corpus}", f"train.teacher={tmp / 'teacher'}",
                 "model.vocab_size=300", "model.n_layers=1", "model.d_model=32",
                 "model.n_heads=2", "model.max_len=32", "data.seq_len=32", "train.batch_size=8"]
    status = cli.main(["compile", "experiments/gpt_tiny.py", "--topology", "v5e:2x2",
                       *[a for o in overrides for a in ("--set", o)]])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] and report["chips"] == 4
