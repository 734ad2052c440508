"""Orbax checkpoints of the train state, with layout metadata checked on restore.

A checkpoint holds the TrainState (step, params, optimizer state) and a JSON record of the
config and parameter shapes. The batch order is a pure function of (seed, step), so the step is
all the data position a resumed run needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.errors import UserError
from jaxformer.train.state import TrainState


class CheckpointError(UserError):
    """A checkpoint that does not fit the model being restored."""


def param_layout(params: Any) -> dict[str, list[int]]:
    """{"blocks/0/attn/w_q": [256, 4, 64], ...}: what a checkpoint must match."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
            for path, leaf in flat}


class Checkpointer:
    """Saves every ``every`` steps (and on demand), keeps the latest ``keep``."""

    def __init__(self, directory: Path, keep: int):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether ``directory`` holds at least one finished checkpoint (creates nothing)."""
        directory = Path(directory)
        return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        meta = {**meta, "step": step, "param_layout": param_layout(state.params)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores onto ``target``'s shapes and shardings (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        expected = param_layout(target.params)
        if meta.get("param_layout") != expected:
            found = meta.get("param_layout", {})
            for name in sorted(set(expected) | set(found)):
                if expected.get(name) != found.get(name):
                    raise CheckpointError(
                        f"checkpoint step {step} does not fit the model: parameter {name} "
                        f"expected shape {expected.get(name)}, found {found.get(name)}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return restored["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
