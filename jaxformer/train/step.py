"""The pure, jitted train and eval steps.

Batches are dicts of [B, T] arrays: ``inputs``, ``targets``, ``segment_ids``, ``positions``
(int32) and ``loss_weights`` (float32). The loss is the weighted cross-entropy summed over the
whole global batch and divided once by the number of real target tokens, so splitting the batch
into micro-batches (gradient accumulation) or over devices does not change it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxformer.nn.attention_families import FeatureRedraw, without_features
from jaxformer.nn.moe_stats import collect_moe_stats
from jaxformer.objectives.distillation import distillation_kl_sums, distilled_loss_sum
from jaxformer.objectives.loss import collect_mtp_sums, cross_entropy_sums
from jaxformer.parallel.sharding import Rules, activation_sharding
from jaxformer.train.state import TrainState
from jaxformer.train.teacher import Teacher

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (model, batch, dropout_rng) -> logits aligned with batch["targets"]: Objective.logits
LogitsFn = Callable[[Any, Batch, jax.Array | None], jax.Array]


def make_loss_sums(graphdef: nnx.GraphDef, forward: LogitsFn, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, moe: tuple[float, float] | None = None,
                   mtp_weight: float = 0.0, teacher: Teacher | None = None,
                   lora: Any = None) -> Callable[..., Metrics]:
    """``loss_sums(params, batch, dropout_rng, teacher_params, adapters)`` -> weighted sums
    (see cross_entropy_sums) of the logits ``forward`` (the objective's model call) returns.

    With LoRA ``adapters`` (``lora.dropout > 0``: ``lora`` is the run's ``train.lora.Lora``)
    ``params`` are the frozen base's and the adapters run as branches beside their kernels,
    their inputs dropped with a key folded from ``dropout_rng`` (``Lora.attach``).

    With a ``teacher`` (knowledge distillation) the label loss becomes ``alpha * CE +
    (1 - alpha) * T^2 * KL(teacher_T || student_T)`` (``objectives.distillation``) with the
    teacher's logits on the same batch; ``alpha`` scales the CE as label smoothing and z-loss
    shape it, and the MoE and MTP terms below are added unscaled. The KL comes back as
    ``distill_kl_sum``; ``nll_sum`` stays the plain NLL.

    With ``moe = (a, b)`` the objective adds ``a * load_balance + b * router_z`` (means over
    the MoE layers), weighted by the batch's target count so that the final division by the
    global count leaves them as plain means; the router statistics come back as ``moe_*``.
    A model with MTP modules adds ``mtp_weight * mtp_loss_sum`` (what the causal objective
    recorded: ``objectives.loss.mtp_loss_sums``), which comes back as ``mtp_*`` too.
    """
    def loss_sums(params: Any, batch: Batch, dropout_rng: jax.Array | None = None,
                  teacher_params: Any = None, adapters: Any = None) -> Metrics:
        model = nnx.merge(graphdef, params)
        if adapters is not None:
            lora.attach(model, adapters, jax.random.fold_in(dropout_rng, LORA_DROPOUT_STREAM))
        capture = nnx.capture(lambda m: forward(m, batch, dropout_rng), nnx.Intermediate)
        logits, intermediates = capture(model)
        sums = cross_entropy_sums(logits, batch["targets"], batch["loss_weights"],
                                  label_smoothing=label_smoothing, z_loss=z_loss)
        if teacher is not None:
            sums.update(distillation_kl_sums(logits, teacher.logits(teacher_params, batch),
                                             batch["loss_weights"], teacher.temperature))
            sums["loss_sum"] = distilled_loss_sum(sums["loss_sum"], sums["distill_kl_sum"],
                                                  teacher.alpha, teacher.temperature)
        if moe is not None:
            stats = collect_moe_stats(intermediates)
            w = sums["weight_sum"]
            sums["loss_sum"] = sums["loss_sum"] + w * (moe[0] * stats["load_balance_loss"]
                                                       + moe[1] * stats["router_z_loss"])
            sums.update({f"moe_{k}_sum": w * v for k, v in stats.items()})
        mtp = collect_mtp_sums(intermediates)  # {} without MTP modules
        if mtp:
            sums["loss_sum"] = sums["loss_sum"] + mtp_weight * mtp["mtp_loss_sum"]
            sums.update(mtp)
        return sums

    return loss_sums


LORA_DROPOUT_STREAM = 0x4C6F5241  # "LoRA": the adapters' dropout keys, apart from the model's


def uses_dropout(model_cfg: Any) -> bool:
    return model_cfg.dropout > 0.0 or model_cfg.attention_dropout > 0.0


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The dropout key of a train step: a pure function of (seed, step), like the batch, so a
    resumed run drops exactly the units the uninterrupted run would have."""
    return jax.random.fold_in(jax.random.key(seed), step)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int, state_sharding: TrainState,
                    batch_sharding: NamedSharding, metrics_sharding: NamedSharding, *,
                    forward: LogitsFn, dropout: bool = False, seed: int = 0,
                    label_smoothing: float = 0.0, z_loss: float = 0.0, mesh: Mesh | None = None,
                    rules: Rules | None = None,
                    moe: tuple[float, float] | None = None, mtp_weight: float = 0.0,
                    redraw: FeatureRedraw | None = None, teacher: Teacher | None = None,
                    lora: Any = None
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds ``step(state, batch) -> (new_state, metrics)``, jitted with explicit shardings
    and the incoming state donated (updated in place). With ``dropout`` the model gets a key
    derived from (seed, step, micro-batch); label smoothing and z-loss shape the objective
    (``loss``), while ``nll`` stays the plain negative log-likelihood. With ``mesh`` and
    ``rules`` the model's activation constraints pin activations to the mesh; ``moe`` adds
    the router losses and ``mtp_weight`` the multi-token-prediction loss (see
    make_loss_sums). ``redraw`` (``model.feature_redraw > 0``) replaces the Performer/RFA
    random features by a fresh draw after every k-th update (a pure function of the seed, the
    new step count and the layer; see ``FeatureRedraw``). ``param_norm`` leaves the features
    out: they are drawn, not trained. With a ``teacher`` the step is
    ``step(state, batch, teacher_params)`` (distillation, see make_loss_sums): the teacher's
    weights are a third argument, not donated, and gradients are taken of the student's only.
    With ``lora`` (a ``jaxformer.train.lora.Lora``: ``merge(adapters, base)``,
    ``params_sharding``) the state's params are LoRA adapters and the frozen weights come as
    the fourth argument ``lora_base`` (not donated; the third is None without a teacher): the
    model runs on the merged weights and the gradient is taken of the adapters through the
    merge, per micro-batch (XLA drops the gradients of weights no adapter reads). With
    ``lora.dropout > 0`` (``lora.branches``)
    the model runs on the base's weights with the adapters as branches beside their kernels
    (``dropout`` must then be on, for the key), and the gradient is the adapters' directly."""
    loss_sums = make_loss_sums(graphdef, forward, label_smoothing, z_loss, moe, mtp_weight,
                               teacher, lora)

    def sum_grads(loss_fn: Callable[..., Metrics], params: Any, batch: Batch,
                  rng: jax.Array | None, teacher_params: Any) -> tuple[Any, Metrics]:
        def objective(p):
            sums = loss_fn(p, batch, rng, teacher_params)
            return sums["loss_sum"], sums

        grads, sums = jax.grad(objective, has_aux=True)(params)
        return grads, sums

    def accumulate(loss_fn: Callable[..., Metrics], params: Any, batch: Batch,
                   rng: jax.Array | None, teacher_params: Any) -> tuple[Any, Metrics]:
        """The gradient sums of ``loss_fn(params, batch, rng, teacher_params)`` over the
        micro-batches, and its sums."""
        if grad_accum == 1:
            return sum_grads(loss_fn, params, batch, rng, teacher_params)

        # [B, T] -> [A, B/A, T]: micro-batch i takes rows i, i+A, ...; rows stay on the
        # device that holds them, since each device's contiguous block splits evenly.
        def split(x):
            return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

        micro = jax.tree.map(split, batch)
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 jax.eval_shape(loss_fn, params, jax.tree.map(
                                     lambda x: x[0], micro), rng, teacher_params))

        def body(carry, xs):
            mb, i = xs
            mb_rng = None if rng is None else jax.random.fold_in(rng, i)
            grads, sums = sum_grads(loss_fn, params, mb, mb_rng, teacher_params)
            acc_g, acc_s = carry
            return (jax.tree.map(jnp.add, acc_g, grads),
                    jax.tree.map(jnp.add, acc_s, sums)), None

        (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums),
                                        (micro, jnp.arange(grad_accum)))
        return grads, sums

    def step(state: TrainState, batch: Batch, teacher_params: Any = None,
             lora_base: Any = None) -> tuple[TrainState, Metrics]:
        rng = dropout_key(seed, state.step) if dropout else None
        with _constraints(mesh, rules):
            if lora is None:
                grads, sums = accumulate(loss_sums, state.params, batch, rng, teacher_params)
            else:
                # The gradient is the adapters' in every micro-batch (with grad_accum > 1 only
                # adapter-sized sums accumulate): through the merge, or the branches.
                def adapted(adapters, b, r, t):
                    if lora.branches:
                        return loss_sums(lora_base, b, r, t, adapters)
                    return loss_sums(lora.merge(adapters, lora_base), b, r, t)

                grads, sums = accumulate(adapted, state.params, batch, rng, teacher_params)
        n = jnp.maximum(sums["weight_sum"], 1.0)
        # Back to each parameter's dtype: n is float32, and float32 gradients of bfloat16
        # parameters would turn the optimizer moments float32 after the first step, so the
        # state would no longer match the step compiled for it.
        grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient (an overflow, a poisoned batch) would write NaN into
        # every parameter and moment; instead the step changes nothing but the step count,
        # so its batch is skipped, and the host counts these steps (train.max_bad_steps).
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        new_step = state.step + 1
        if redraw is not None:  # after the update (and its non-finite guard): by step count
            params = redraw(params, new_step)
        metrics = {
            "loss": sums["loss_sum"] / n,
            "nll": sums["nll_sum"] / n,
            "z_loss": sums["z_loss_sum"] / n,
            "accuracy": sums["correct_sum"] / n,
            "target_tokens": sums["weight_sum"],
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(without_features(params)),
            "lr": schedule(state.step),
            "skipped": 1.0 - finite.astype(jnp.float32),  # 1: the update was not applied
        }
        metrics.update({k[:-len("_sum")]: v / n for k, v in sums.items()
                        if k.startswith(("moe_", "mtp_", "distill_"))})
        new_state = TrainState(step=new_step, params=params, opt_state=opt_state)
        return new_state, metrics

    in_shardings = (state_sharding, batch_sharding)
    if teacher is not None:  # the teacher's weights: read every step, never donated
        in_shardings += (teacher.params_sharding,)
    if lora is not None:  # LoRA's frozen base: the fourth argument, never donated
        in_shardings = (*in_shardings[:2], in_shardings[2] if teacher else None,
                        lora.params_sharding)
    return jax.jit(step, in_shardings=in_shardings,
                   out_shardings=(state_sharding, metrics_sharding), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, params_sharding: Any, batch_sharding: NamedSharding,
                   metrics_sharding: NamedSharding, *, forward: LogitsFn,
                   mesh: Mesh | None = None, rules: Rules | None = None
                   ) -> Callable[[Any, Batch], Metrics]:
    """Builds ``eval_step(params, batch) -> {loss_sum, weight_sum, correct_sum, ...}``."""
    loss_sums = make_loss_sums(graphdef, forward)

    def eval_step(params: Any, batch: Batch) -> Metrics:
        with _constraints(mesh, rules):
            return loss_sums(params, batch)

    return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding),
                   out_shardings=metrics_sharding)


def _constraints(mesh: Mesh | None, rules: Rules | None):
    """The activation-sharding context while the step is traced (nothing without a mesh)."""
    import contextlib

    if mesh is None or rules is None:
        return contextlib.nullcontext()
    return activation_sharding(mesh, rules)
