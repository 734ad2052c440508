"""Knowledge distillation's soft-target term (Hinton, Vinyals and Dean 2015, "Distilling the
Knowledge in a Neural Network").

Per target token, with both softmaxes at temperature T,

    KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)),
    p_t = softmax(teacher_logits / T),  p_s = softmax(student_logits / T),

and the objective the train step differentiates is

    alpha * CE(labels) + (1 - alpha) * T^2 * KL.

The T^2 keeps the soft term's gradient, ``T * (p_s - p_t)`` per logit, on the scale of the
hard term's as T changes (the paper's section 2). Like ``cross_entropy_sums`` this returns a
``loss_weights``-weighted *sum* over tokens, divided once by the batch's real-target count by
the caller, so micro-batches and devices add exactly.
Letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def distillation_kl_sums(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                         weights: jnp.ndarray, temperature: float) -> dict[str, jnp.ndarray]:
    """student_logits, teacher_logits: [B, T, V]; weights: [B, T] -> ``{"distill_kl_sum"}``,
    a float32 scalar: sum over tokens of ``weights * KL(p_t || p_s)`` at ``temperature``.

    Computed in float32 from log-softmaxes (no 0 * log 0: ``p_t * log p_t`` is evaluated as
    ``exp(lt) * lt``, finite wherever ``lt`` is). The teacher's logits get no gradient."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)  # [B, T]
    return {"distill_kl_sum": jnp.sum(kl * weights.astype(jnp.float32))}


def distilled_loss_sum(ce_sum: jnp.ndarray, kl_sum: jnp.ndarray, alpha: float,
                       temperature: float) -> jnp.ndarray:
    """The distillation objective from its two weighted sums (see the module docstring)."""
    return alpha * ce_sum + (1.0 - alpha) * temperature ** 2 * kl_sum
