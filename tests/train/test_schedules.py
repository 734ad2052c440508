"""Each learning-rate schedule against its formula, written out independently in numpy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError, TrainConfig
from jaxformer.train.optimizer import learning_rate_schedule, make_optimizer, warmup_steps

LR, STEPS, WARMUP, RATIO = 1e-3, 200, 20, 0.1
END = LR * RATIO
PROBES = [0, 1, 10, 19, 20, 21, 60, 110, 159, 160, 161, 180, 199, 200, 250]


def cfg_for(schedule: str, **kw) -> TrainConfig:
    base = dict(lr=LR, steps=STEPS, warmup_steps=WARMUP, min_lr_ratio=RATIO, schedule=schedule)
    return TrainConfig(**{**base, **kw})


def warm(step: int) -> float:
    return LR * step / WARMUP


def frac_after_warmup(step: int) -> float:
    return min((step - WARMUP) / (STEPS - WARMUP), 1.0)


def want_cosine(step: int) -> float:
    if step < WARMUP:
        return warm(step)
    return END + (LR - END) * 0.5 * (1 + np.cos(np.pi * frac_after_warmup(step)))


def want_linear(step: int) -> float:
    if step < WARMUP:
        return warm(step)
    return LR + (END - LR) * frac_after_warmup(step)


def want_constant(step: int) -> float:
    return warm(step) if step < WARMUP else LR


def want_wsd(step: int, decay_fraction: float = 0.2) -> float:
    start = STEPS - round(decay_fraction * STEPS)  # 160 for 0.2
    if step < WARMUP:
        return warm(step)
    if step < start:
        return LR
    return LR + (END - LR) * min((step - start) / (STEPS - start), 1.0)


@pytest.mark.parametrize("name,want", [("cosine", want_cosine), ("linear", want_linear),
                                       ("constant", want_constant), ("wsd", want_wsd)])
def test_warmup_schedules_match_formula(name, want):
    sched = learning_rate_schedule(cfg_for(name))
    for step in PROBES:
        np.testing.assert_allclose(float(sched(step)), want(step), rtol=1e-5, atol=1e-10,
                                   err_msg=f"{name} at step {step}")


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_endpoints_and_final_value(name):
    sched = learning_rate_schedule(cfg_for(name))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(WARMUP // 2)), LR / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(WARMUP)), LR, rtol=1e-6)
    final = LR if name == "constant" else END
    np.testing.assert_allclose(float(sched(STEPS)), final, rtol=1e-5)
    np.testing.assert_allclose(float(sched(STEPS + 100)), final, rtol=1e-5)


@pytest.mark.parametrize("name,want", [("cosine", want_cosine), ("linear", want_linear),
                                       ("constant", want_constant), ("wsd", want_wsd)])
def test_no_warmup_starts_at_lr(name, want):
    del want
    sched = learning_rate_schedule(cfg_for(name, warmup_steps=0))
    np.testing.assert_allclose(float(sched(0)), LR, rtol=1e-6)
    final = LR if name == "constant" else END
    np.testing.assert_allclose(float(sched(STEPS)), final, rtol=1e-5)


def test_linear_no_warmup_midpoint():
    sched = learning_rate_schedule(cfg_for("linear", warmup_steps=0))
    np.testing.assert_allclose(float(sched(STEPS // 2)), (LR + END) / 2, rtol=1e-5)


def test_wsd_boundaries():
    sched = learning_rate_schedule(cfg_for("wsd", decay_fraction=0.25))
    start = STEPS - 50  # the last 25% of 200 steps
    np.testing.assert_allclose(float(sched(WARMUP)), LR, rtol=1e-6)
    np.testing.assert_allclose(float(sched(start - 1)), LR, rtol=1e-6)  # still stable
    np.testing.assert_allclose(float(sched(start)), LR, rtol=1e-6)  # decay starts at lr
    np.testing.assert_allclose(float(sched(start + 1)), LR + (END - LR) / 50, rtol=1e-5)
    np.testing.assert_allclose(float(sched(start + 25)), (LR + END) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(sched(STEPS)), END, rtol=1e-5)
    for step in range(0, STEPS + 1, 7):
        np.testing.assert_allclose(float(sched(step)), want_wsd(step, 0.25), rtol=1e-5,
                                   atol=1e-10)


def test_wsd_decay_never_starts_inside_warmup():
    # decay_fraction=1 would decay from step 0; the decay starts when warmup ends instead.
    sched = learning_rate_schedule(cfg_for("wsd", decay_fraction=1.0))
    np.testing.assert_allclose(float(sched(WARMUP)), LR, rtol=1e-6)
    mid = WARMUP + (STEPS - WARMUP) // 2
    np.testing.assert_allclose(float(sched(mid)), (LR + END) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(sched(STEPS)), END, rtol=1e-5)


def inverse_sqrt_2017(step_num: float, d_model: int, warmup: int) -> float:
    """Vaswani et al. (2017), eq. (3); step_num counts from 1."""
    return d_model ** -0.5 * min(step_num ** -0.5, step_num * warmup ** -1.5)


def test_inverse_sqrt_matches_2017_formula():
    cfg = TrainConfig(lr=1.0, steps=100_000, warmup_steps=4000, schedule="inverse_sqrt")
    sched = learning_rate_schedule(cfg, d_model=512)
    # Optimizer step n (0-based) is the paper's step_num = n + 1.
    for n in [0, 1, 9, 999, 1999, 3998, 3999, 4000, 4001, 10_000, 50_000, 99_999]:
        np.testing.assert_allclose(float(sched(n)), inverse_sqrt_2017(n + 1, 512, 4000),
                                   rtol=1e-5, err_msg=f"step {n}")
    peak = float(sched(3999))
    np.testing.assert_allclose(peak, 512 ** -0.5 * 4000 ** -0.5, rtol=1e-5)
    assert abs(peak - 7.0e-4) < 0.02e-4
    values = [float(sched(n)) for n in range(0, 8000, 50)]
    assert max(values) <= peak * (1 + 1e-6)
    assert float(sched(0)) == pytest.approx(512 ** -0.5 * 4000 ** -1.5, rel=1e-5)
    # Under jit with the optimizer's int32 step count, as in the train step.
    np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(3999))), peak, rtol=1e-6)


def test_inverse_sqrt_lr_is_a_multiplier():
    one = learning_rate_schedule(TrainConfig(lr=1.0, steps=1000, warmup_steps=100,
                                             schedule="inverse_sqrt"), d_model=64)
    two = learning_rate_schedule(TrainConfig(lr=2.0, steps=1000, warmup_steps=100,
                                             schedule="inverse_sqrt"), d_model=64)
    for n in [0, 50, 99, 500]:
        np.testing.assert_allclose(float(two(n)), 2 * float(one(n)), rtol=1e-6)
        np.testing.assert_allclose(float(one(n)), inverse_sqrt_2017(n + 1, 64, 100), rtol=1e-5)


def test_inverse_sqrt_without_warmup_is_rsqrt():
    sched = learning_rate_schedule(TrainConfig(lr=1.0, steps=1000, warmup_steps=0,
                                               schedule="inverse_sqrt"), d_model=256)
    for n in [0, 3, 99]:
        np.testing.assert_allclose(float(sched(n)), 256 ** -0.5 * (n + 1) ** -0.5, rtol=1e-5)


def test_inverse_sqrt_needs_d_model():
    cfg = TrainConfig(schedule="inverse_sqrt")
    with pytest.raises(ValueError, match="d_model"):
        learning_rate_schedule(cfg)
    with pytest.raises(ValueError, match="d_model"):
        make_optimizer(cfg)
    make_optimizer(cfg, d_model=128)  # builds


def test_callers_without_d_model_still_work():
    for name in ("cosine", "linear", "constant", "wsd"):
        learning_rate_schedule(cfg_for(name))
        make_optimizer(cfg_for(name))
        make_optimizer(cfg_for(name), d_model=64)


def test_default_warmup_is_two_percent_of_steps():
    assert TrainConfig().warmup_steps == -1
    assert TrainConfig().schedule == "cosine"
    assert TrainConfig().decay_fraction == 0.2
    assert warmup_steps(TrainConfig(steps=1000)) == 20
    assert warmup_steps(TrainConfig(steps=5000)) == 100
    assert warmup_steps(TrainConfig(steps=450)) == 9
    assert warmup_steps(TrainConfig(steps=75)) == 2  # 1.5 rounds half up
    assert warmup_steps(TrainConfig(steps=125)) == 3  # 2.5 rounds half up
    assert warmup_steps(TrainConfig(steps=10)) == 1  # at least 1
    assert warmup_steps(TrainConfig(steps=2)) == 1
    assert warmup_steps(TrainConfig(steps=1)) == 0  # a one-step run gets no warmup
    assert warmup_steps(TrainConfig(steps=1000, warmup_steps=0)) == 0  # explicit values kept
    assert warmup_steps(TrainConfig(steps=1000, warmup_steps=7)) == 7


def test_default_warmup_drives_the_schedule():
    cfg = TrainConfig(lr=1e-3, steps=1000, min_lr_ratio=0.1)  # warmup 20
    sched = learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(sched(10)), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(20)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(1000)), 1e-4, rtol=1e-5)
    one_step = learning_rate_schedule(TrainConfig(lr=1e-3, steps=1))
    assert float(one_step(0)) == pytest.approx(1e-3)


def with_train(**kw) -> Config:
    return dataclasses.replace(Config(), train=dataclasses.replace(Config().train, **kw))


def test_validation_accepts_schedules_and_warmup_range():
    for name in ("cosine", "linear", "constant", "wsd", "inverse_sqrt"):
        config_lib.validate(with_train(schedule=name))
    for warmup in (-1, 0, 500, 1000):
        config_lib.validate(with_train(steps=1000, warmup_steps=warmup))
    config_lib.validate(with_train(decay_fraction=1.0))
    cfg = config_lib.apply_overrides(Config(), ["train.schedule=wsd", "train.decay_fraction=0.1",
                                                "train.warmup_steps=-1"])
    assert (cfg.train.schedule, cfg.train.decay_fraction, cfg.train.warmup_steps) == (
        "wsd", 0.1, -1)


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="exponential"), r"train.schedule: 'exponential'; choose one of cosine"),
    (dict(warmup_steps=-2), r"train.warmup_steps=-2 must be -1"),
    (dict(steps=100, warmup_steps=101), r"train.warmup_steps=101 must be -1 .* train.steps=100"),
    (dict(decay_fraction=0.0), r"train.decay_fraction: 0.0 must be in \(0, 1\]"),
    (dict(decay_fraction=1.5), r"train.decay_fraction: 1.5 must be in \(0, 1\]"),
])
def test_validation_rejects(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        config_lib.validate(with_train(**kw))
    assert "\n" not in str(info.value)
