"""What changing the step count of a run with a checkpoint does to its learning rate.

The LR schedule is planned over ``train.steps`` (or ``train.schedule_steps``). Resuming a run
with another length would silently re-plan it: extending a finished 60-step cosine run to 120
steps makes the LR jump from its end value back up to the middle of the longer cosine. So the
change must be chosen explicitly with ``train.schedule_steps``: the old length keeps the old
schedule (held at its end value), the new length re-plans the decay over the new length.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxformer.config import Config, TrainConfig
from jaxformer.errors import UserError
from jaxformer.runs import rundir
from jaxformer.train.optimizer import learning_rate_schedule


def schedule_length(t: TrainConfig) -> int:
    return t.schedule_steps or t.steps


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of 0-based optimizer step ``step`` under ``cfg``."""
    return float(learning_rate_schedule(cfg.train, cfg.model.d_model)(step))


def check_schedule_change(saved: Config, new: Config, run_dir: Path) -> str | None:
    """A one-line UserError when ``new`` re-plans the schedule of a run that has trained
    without saying how (``train.schedule_steps`` unset); otherwise a note of what the LR does
    at the resumed step when it changes (None when nothing changes)."""
    step = rundir.latest_checkpoint_step(run_dir)
    if not step:
        return None
    old_len, new_len = schedule_length(saved.train), schedule_length(new.train)
    # The LR of the next step under the old plan, and under the plan now asked for.
    old_cfg = dataclasses.replace(new, train=dataclasses.replace(
        new.train, steps=saved.train.steps, schedule_steps=old_len))
    before, after = lr_at(old_cfg, step), lr_at(new, step)
    if old_len == new_len and before == after:
        return None
    if not new.train.schedule_steps and old_len != new_len:
        keep = lr_at(old_cfg, step)
        raise UserError(
            f"train.steps {saved.train.steps} -> {new.train.steps} re-plans the learning-rate "
            f"schedule of {run_dir} (at step {step}): choose --set train.schedule_steps="
            f"{old_len} to keep the old schedule (LR {keep:.3g}, held at its end value "
            f"{lr_at(old_cfg, old_len):.3g} after step {old_len}), or --set "
            f"train.schedule_steps={new_len} to plan the decay over the new length (LR "
            f"{before:.3g} -> {after:.3g} at step {step + 1})")
    if before == after:
        return f"schedule: over {new_len} steps; LR {after:.3g} at step {step + 1}, as before"
    return (f"schedule: over {new_len} steps (was {old_len}); the LR at step {step + 1} "
            f"changes from {before:.3g} to {after:.3g}")
