"""AdamW with linear warmup then cosine decay, and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxformer.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine down to lr * min_lr_ratio at steps."""
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    del end
    return optax.join_schedules([warmup, cosine], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW; weight decay only on matrices (not on biases and norm scales)."""
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
