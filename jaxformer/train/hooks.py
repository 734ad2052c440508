"""Periodic work of the train loop as hooks: metrics, evaluation, checkpoints.

A hook is any object with ``after_step(run, step, metrics)`` (``run``: the loop's
``jaxformer.train.loop.Run``; ``step``: 1-based, after the update; ``metrics``: the step's
metrics, still on the device). Each hook decides itself when it acts.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

from jaxformer import inference
from jaxformer.errors import DivergedError
from jaxformer.models.build import looped
from jaxformer.runs.checkpoint import CheckpointSaveError
from jaxformer.train.flops import implausible_mfu_note, mfu
from jaxformer.train.reporting import format_metrics

if TYPE_CHECKING:  # the loop imports this module; the type only names it
    from jaxformer.train.loop import Run

Metrics = dict[str, jax.Array]


class Hook(Protocol):
    def after_step(self, run: Run, step: int, metrics: Metrics) -> None: ...


class MetricsLogger:
    """Every ``log.every`` steps (and at the last step): the interval's mean train loss and
    the last step's metrics, tokens/s and MFU to TensorBoard and the console. Metrics stay on
    the device until then, so logging does not stall the steps in between."""

    def __init__(self, run: Run, end: int):
        cfg = run.cfg
        self.every, self.end = cfg.log.every, end
        self.max_bad_steps = cfg.train.max_bad_steps
        self.bad_streak = 0  # non-finite steps in a row, up to the last fetched one
        self.skipped_total = 0
        self.warned_mfu = False
        self.pending: list[tuple[int, Metrics]] = []
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.fpt = run.rt.flops_per_token()[0]
        self.last_time, self.last_step = time.perf_counter(), run.start

    def after_step(self, run: Run, step: int, metrics: Metrics) -> None:
        self.pending.append((step, metrics))
        if step % self.every and step != self.end:
            return
        fetched = jax.device_get(self.pending)
        self.pending.clear()
        now = time.perf_counter()
        elapsed = (now - self.last_time) / (step - self.last_step)
        self.last_time, self.last_step = now, step
        for s, m in fetched:
            run.losses[s] = float(m["loss"])
        skipped = [s for s, m in fetched if m["skipped"]]
        values = self.values(run, step, fetched, elapsed)
        note = implausible_mfu_note(values["mfu_percent"], run.peak)
        if note and not self.warned_mfu:
            self.warned_mfu = True
            run.say(note)
        run.reporter.scalars(step, values, "train")
        self.check_bad_steps(run, fetched, skipped)
        run.bar.set_postfix(loss=f"{values['loss']:.3f}",
                            tok_s=f"{values['tokens_per_sec']:,.0f}")
        run.say(f"step {step:>6} | {format_metrics(values)}")

    def check_bad_steps(self, run: Run, fetched: list[tuple[int, dict[str, Any]]],
                        skipped: list[int]) -> None:
        """Counts the skipped (non-finite) steps; at ``train.max_bad_steps`` in a row the run
        stops (``DivergedError``). Checked here, where the metrics reach the host anyway, so the
        steps in between never wait on the device."""
        if skipped:
            self.skipped_total += len(skipped)
            run.say(f"warning: step(s) {_ranges(skipped)} had a non-finite loss or gradient; "
                    f"their updates were skipped ({self.skipped_total} so far)")
        for s, m in fetched:
            self.bad_streak = self.bad_streak + 1 if m["skipped"] else 0
            if self.bad_streak >= self.max_bad_steps:
                first = s - self.bad_streak + 1
                latest = run.ckpt.latest_step()
                raise DivergedError(
                    f"training diverged: steps {first}-{s} all had a non-finite loss or "
                    f"gradient (train.max_bad_steps={self.max_bad_steps} in a row); their "
                    f"updates were skipped, so no checkpoint holds non-finite weights (latest: "
                    f"{'none' if latest is None else f'step {latest}'}); lower train.lr or "
                    "check the data, then resume with --allow-config-change")

    def values(self, run: Run, step: int, fetched: list[tuple[int, dict[str, Any]]],
               elapsed: float) -> dict[str, float]:
        m = fetched[-1][1]
        tps = self.tokens_per_step / elapsed
        # Skipped steps' metrics are NaN or Inf: the interval's means leave them out.
        good = [f for f in fetched if not f[1]["skipped"]] or fetched

        def mean(key: str) -> float:
            return float(np.mean([f[1][key] for f in good]))

        values = {"loss": mean("loss"), "accuracy": float(m["accuracy"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "param_norm": float(m["param_norm"]),
                  "tokens_per_sec": tps, "step_time_s": elapsed,
                  "mfu_percent": 100 * mfu(self.fpt, tps, run.rt.mesh.size, run.peak.flops),
                  "skipped_steps": float(sum(bool(f[1]["skipped"]) for f in fetched))}
        o, model = run.cfg.objective, run.cfg.model
        if o.label_smoothing or o.z_loss:
            values.update(nll=mean("nll"), z_loss=mean("z_loss"))
        if "distill_kl" in m:  # loss = alpha * CE + (1 - alpha) * T^2 * distill_kl
            values.update(nll=mean("nll"), distill_kl=mean("distill_kl"))
        if model.mtp_heads:  # loss = nll + mtp_weight * mtp_loss (mean of mtp_loss_1 .. n)
            values.update(nll=mean("nll"), **{k: mean(k) for k in m if k.startswith("mtp_loss")})
        if model.n_experts:
            load = np.mean([f[1]["moe_expert_load"] for f in fetched], axis=0)
            values.update(moe_balance_loss=mean("moe_load_balance_loss"),
                          moe_z_loss=mean("moe_router_z_loss"),
                          moe_dropped=mean("moe_dropped_fraction"),
                          moe_max_load=float(load.max() * len(load)))
            run.reporter.expert_load(step, load)
        return values


class Evaluator:
    """Every ``eval.every`` steps and at ``train.steps``: the validation loss, perplexity and
    accuracy, plus the metrics the objective computes by decoding (``decode_metrics``)."""

    def __init__(self, run: Run):
        self.every, self.end = run.cfg.eval.every, run.cfg.train.steps

    def after_step(self, run: Run, step: int, metrics: Metrics) -> None:
        if step % self.every and step != self.end:
            return
        ev = evaluate(run, run.rt.model_params(run.state.params))  # LoRA: merged
        run.evals[step] = ev
        run.reporter.scalars(step, ev, "eval")
        extra = "".join(f" | {name.replace('_', ' ')} {ev[name]:.3f}"
                        for name in run.objective.decode_metrics)
        run.say(f"step {step:>6} | eval loss {ev['loss']:.4f} | perplexity "
                f"{ev['perplexity']:.2f} | accuracy {ev['accuracy']:.3f}{extra}"
                f"{run.baseline_note}")


def evaluate(run: Run, params: Any) -> dict[str, float]:
    """Loss, perplexity and accuracy over ``eval.batches`` validation batches (0: all)."""
    cfg = run.cfg
    sums = np.zeros(3)
    for batch in run.task.val_batches(cfg.train.batch_size, cfg.eval.batches or None):
        out = run.rt.eval_step(params, run.rt.put_batch(batch))
        sums += [float(out["nll_sum"]), float(out["weight_sum"]), float(out["correct_sum"])]
    loss = sums[0] / max(sums[1], 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "accuracy": sums[2] / max(sums[1], 1.0)}
    if run.objective.decode_metrics:
        _, view, view_params = looped(cfg.model, host_params(params))
        for name in run.objective.decode_metrics:
            result[name] = inference.DECODE_METRICS[name](cfg, view, view_params, run.task)
    return result


class CheckpointSaver:
    """Every ``checkpoint.every`` steps and at the invocation's last step ``end``. A failed
    save (found at once, or when a background write reports it) stops the run, or with
    ``checkpoint.on_error=retry`` is reported and tried again at the next interval."""

    def __init__(self, end: int):
        self.end = end

    def after_step(self, run: Run, step: int, metrics: Metrics) -> None:
        due = step % run.cfg.checkpoint.every == 0 or step == self.end
        try:
            run.ckpt.check()  # a background write that failed since (does not wait)
            if due:
                run.save()
        except CheckpointSaveError as e:
            if run.cfg.checkpoint.on_error != "retry":
                raise
            run.say(f"warning: {e}; training goes on (checkpoint.on_error=retry), the next "
                    "save is at the next interval")
            if step == self.end:
                raise


def _ranges(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    parts, start = [], steps[0]
    for prev, cur in zip(steps, [*steps[1:], None], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def host_params(params: Any) -> Any:
    """The full parameters as host arrays on every process (a collective with several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)
