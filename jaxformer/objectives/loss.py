"""The one loss: weighted token cross-entropy, normalized by the number of real targets, with
optional label smoothing and z-loss.

Returning sums (not means) lets gradient accumulation and data-parallel reductions add
micro-batches exactly and divide once by the total target count.
Letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


@jax.custom_vjp
def log_z_and_target_logit(logits: jnp.ndarray, targets: jnp.ndarray
                           ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """logits: [..., V] float32, targets: [...] int -> (log Z, logits[target], max logit),
    each [...].

    One max pass and one exp-sum pass over the logits; the max also gives accuracy for free
    (the target is an argmax hit when its logit equals the max), where ``jnp.argmax`` would be a
    third, slow pass (a variadic value-and-index reduction on CPU). The custom VJP writes the
    logits' gradient in one fused element-wise pass,
    ``softmax · ḡ_logZ + onehot(target) · ḡ_target``, instead of the scatter that the gradient
    of ``take_along_axis`` becomes, plus the copies XLA adds around it.
    """
    return _forward(logits, targets)


def _forward(logits, targets):
    max_logit = jnp.max(logits, axis=-1)
    shifted = logits - jax.lax.stop_gradient(max_logit)[..., None]
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z, target_logit, max_logit


def _fwd(logits, targets):
    log_z, target_logit, max_logit = _forward(logits, targets)
    return (log_z, target_logit, max_logit), (logits, targets, log_z)


def _bwd(residuals, cotangents):
    logits, targets, log_z = residuals
    g_log_z, g_target, _ = cotangents  # the max is only used for accuracy: no gradient
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    onehot = vocab == targets[..., None]
    softmax = jnp.exp(logits - log_z[..., None])
    g = softmax * g_log_z[..., None] + jnp.where(onehot, g_target[..., None], 0.0)
    return g.astype(logits.dtype), None


log_z_and_target_logit.defvjp(_fwd, _bwd)


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *,
                       label_smoothing: float = 0.0,
                       z_loss: float = 0.0) -> dict[str, jnp.ndarray]:
    """logits: [B, T, V] float32, targets: [B, T] int, weights: [B, T] float.

    Per token, with ``log Z = logsumexp(logits)`` and ``eps = label_smoothing``:

    - nll = log Z - logits[target] (the plain negative log-likelihood);
    - smoothed cross-entropy (Szegedy et al. 2016; Vaswani et al. 2017) against the target
      distribution ``(1 - eps) * onehot + eps / V``, i.e. what ``optax.smooth_labels`` then
      ``optax.softmax_cross_entropy`` give, computed without the [B, T, V] one-hot as
      ``(1 - eps) * nll + eps * (log Z - mean_v logits)``;
    - z term (PaLM, Chowdhery et al. 2022): ``z_loss * (log Z)^2``.

    -> float32 scalars, each a ``weights``-weighted sum over tokens:
    ``"loss_sum"`` the objective to differentiate (smoothed cross-entropy + z term; the plain
    nll when both options are 0), ``"nll_sum"`` the unsmoothed nll without z term (for
    perplexity), ``"z_loss_sum"`` the z terms alone (0 when ``z_loss == 0``), ``"weight_sum"``,
    and ``"correct_sum"`` (argmax hits: the target's logit is the largest; an exact tie with
    another token counts as a hit).
    """
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if isinstance(z_loss, (int, float)) and z_loss < 0:
        raise ValueError(f"z_loss={z_loss} must be >= 0")
    logits = logits.astype(jnp.float32)
    log_z, target_logit, max_logit = log_z_and_target_logit(logits, targets)
    nll = log_z - target_logit
    weights = weights.astype(jnp.float32)
    correct = (target_logit >= max_logit).astype(jnp.float32)
    loss = nll
    z_loss_sum = jnp.zeros((), jnp.float32)
    if label_smoothing:
        uniform = log_z - jnp.mean(logits, axis=-1)  # cross-entropy against 1/V everywhere
        loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    if z_loss:
        z_terms = z_loss * jnp.square(log_z)
        loss = loss + z_terms
        z_loss_sum = jnp.sum(z_terms * weights)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "nll_sum": jnp.sum(nll * weights),
        "z_loss_sum": z_loss_sum,
        "weight_sum": jnp.sum(weights),
        "correct_sum": jnp.sum(correct * weights),
    }


def shift_left(x: jnp.ndarray, k: int) -> jnp.ndarray:
    """[B, T] -> [B, T] with column i holding x[:, i + k] (0 past the end)."""
    return jnp.pad(x[:, k:], ((0, 0), (0, min(k, x.shape[1]))))


def mtp_loss_sums(mtp_logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                  segment_ids: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The multi-token-prediction losses of a causal batch (DeepSeek-V3's MTP; the plain nll,
    without label smoothing or z-loss).

    mtp_logits: [n, B, T, V] (``DecoderLM(..., return_mtp=True)``): depth k at position i
    predicts ``targets[:, i + k]``; targets, weights, segment_ids: [B, T] of the batch. That
    target counts with ``weights[:, i + k]``, and not at all past the row's end or in another
    document than position i (``segment_ids`` differ) -> float32 scalars
    ``mtp_loss_{k}_sum`` (depth k's weighted nll sum, k = 1 .. n) and ``mtp_loss_sum`` (their
    mean over the depths). Like every loss sum they are divided by the batch's main target
    count (``cross_entropy_sums``' weight_sum) at the end, as DeepSeek-V3 divides by T, so
    micro-batches add exactly; depth k has k fewer targets per document, so its loss reads a
    little below a per-target mean.
    """
    weights = weights.astype(jnp.float32)
    out = {}
    for k in range(1, mtp_logits.shape[0] + 1):
        same_doc = shift_left(segment_ids, k) == segment_ids
        w_k = shift_left(weights, k) * same_doc  # 0 past the end: shift_left pads with 0
        log_z, target_logit, _ = log_z_and_target_logit(mtp_logits[k - 1].astype(jnp.float32),
                                                        shift_left(targets, k))
        out[f"mtp_loss_{k}_sum"] = jnp.sum((log_z - target_logit) * w_k)
    out["mtp_loss_sum"] = sum(out.values()) / mtp_logits.shape[0]
    return out


MTP_SUMS = "mtp_sums"  # the nnx.Intermediate name the causal objective records them under


def collect_mtp_sums(intermediates: object) -> dict[str, jnp.ndarray]:
    """The ``mtp_loss_sums`` a forward pass recorded (``nnx.capture`` intermediates, an
    ``nnx.State`` or a pure dict) -> that dict; {} when the model has no MTP modules."""
    tree = (nnx.to_pure_dict(intermediates) if isinstance(intermediates, nnx.State)
            else intermediates)
    found = tree.get(MTP_SUMS) if isinstance(tree, dict) else None
    if not found:
        return {}
    return dict(found[0] if isinstance(found, tuple | list) else found)
