"""Learning-rate schedules (warmup then cosine / linear / constant / WSD / inverse-sqrt), and
AdamW with global-norm clipping.

Step convention: a schedule is evaluated at the optimizer's step count, which is 0-based (the
first update uses ``schedule(0)``). Warmup rises linearly from ``schedule(0) = 0`` to
``schedule(warmup) = lr``; the decaying schedules reach their end value at ``schedule(steps)``.
The inverse-sqrt schedule counts from 1 instead, see ``inverse_sqrt_schedule``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from jaxformer.config import ModelConfig, TrainConfig
from jaxformer.nn.attention_families import entry_name, is_feature_path


def warmup_steps(cfg: TrainConfig) -> int:
    """The warmup length: ``cfg.warmup_steps`` as set, or for -1 (the default) 2% of
    ``cfg.steps`` rounded half up, at least 1 -- except 0 when ``cfg.steps < 2`` (a one-step run
    would otherwise spend its only step at learning rate 0)."""
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    if cfg.steps < 2:
        return 0
    return max(1, (2 * cfg.steps + 50) // 100)  # round(0.02 * steps), halves up, exact


def wsd_decay_start(cfg: TrainConfig) -> int:
    """First step of the WSD decay: ``steps - round(decay_fraction * steps)``, but not before
    the warmup ends."""
    decay = int(round(cfg.decay_fraction * cfg.steps))
    return max(warmup_steps(cfg), cfg.steps - decay)


def inverse_sqrt_schedule(scale: float, d_model: int, warmup: int) -> optax.Schedule:
    """Vaswani et al. (2017): ``scale * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)``.

    ``n = step + 1``: the paper's step_num counts from 1, so optimizer step 0 is the paper's
    step 1 (no division by zero) and the peak ``scale * (d_model * warmup)^-0.5`` is at optimizer
    step ``warmup - 1``. With ``warmup == 0`` it is ``scale * d_model^-0.5 * n^-0.5``.
    """
    def schedule(step):
        n = jnp.asarray(step, jnp.float32) + 1.0
        decay = jax.lax.rsqrt(n)
        if warmup > 0:
            decay = jnp.minimum(decay, n * float(warmup) ** -1.5)
        return scale * float(d_model) ** -0.5 * decay

    return schedule


def learning_rate_schedule(cfg: TrainConfig, d_model: int | None = None) -> optax.Schedule:
    """The schedule named by ``cfg.schedule``, after a linear 0 -> lr warmup:

    - cosine: cosine from lr down to lr * min_lr_ratio at ``steps``, then held there;
    - linear: linear from lr down to lr * min_lr_ratio at ``steps``, then held there;
    - constant: lr;
    - wsd (warmup-stable-decay): lr until the last ``decay_fraction`` of the steps
      (``wsd_decay_start``), then linear down to lr * min_lr_ratio at ``steps``;
    - inverse_sqrt: ``inverse_sqrt_schedule(cfg.lr, d_model, warmup)`` -- here ``train.lr`` is
      a multiplier (1.0 reproduces the paper), not the peak rate, and ``d_model`` is required.

    The warmup length is ``warmup_steps(cfg)``. ``steps`` is ``cfg.schedule_steps`` when set
    (a run extended past the schedule it was planned with), ``cfg.steps`` otherwise.
    """
    if cfg.schedule_steps:
        cfg = dataclasses.replace(cfg, steps=cfg.schedule_steps)
    lr, warmup = cfg.lr, warmup_steps(cfg)
    end = lr * cfg.min_lr_ratio
    after = max(cfg.steps - warmup, 1)  # steps from the end of warmup to the end of training
    if cfg.schedule == "inverse_sqrt":
        if d_model is None:
            raise ValueError("train.schedule='inverse_sqrt' needs d_model: call "
                             "learning_rate_schedule(cfg, d_model=...)")
        return inverse_sqrt_schedule(lr, d_model, warmup)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, after, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, after)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "wsd":
        start = wsd_decay_start(cfg)
        main = optax.linear_schedule(lr, end, max(cfg.steps - start, 1),
                                     transition_begin=start - warmup)
    else:
        raise ValueError(f"unknown train.schedule {cfg.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params, frozen: tuple[str, ...] = ()):
    """Which leaves weight decay shrinks: matrices, not biases, norm scales, the random
    features of Performer/RFA layers (model state that is drawn, never trained) or the
    parameters under a ``frozen`` top-level name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (p.ndim >= 2 and not is_feature_path(path)
                         and not is_frozen_path(path, frozen)), params)


def is_frozen_path(path, frozen: tuple[str, ...]) -> bool:
    """Whether a tree path starts with one of the ``frozen`` names (``model.freeze_vision``:
    ``vision``)."""
    if not frozen or not path:
        return False
    return entry_name(path[0]) in frozen


def make_optimizer(cfg: TrainConfig, d_model: int | None = None,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """Clip, then AdamW; weight decay only on matrices (``decay_mask``). Random features, and
    the parameters under a ``frozen`` top-level name (whose forward pass reads them through
    ``stop_gradient``), get a zero gradient, so Adam's moments stay 0 and their update is
    exactly 0. ``d_model`` is passed to ``learning_rate_schedule`` (needed by inverse_sqrt
    only)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg, d_model), b1=cfg.beta1, b2=cfg.beta2,
                             weight_decay=cfg.weight_decay,
                             mask=functools.partial(decay_mask, frozen=frozen)))
    return optax.chain(*parts)


def frozen_params(cfg: ModelConfig) -> tuple[str, ...]:
    """The top-level parameter names the model's config keeps fixed."""
    return ("vision",) if cfg.freeze_vision else ()
