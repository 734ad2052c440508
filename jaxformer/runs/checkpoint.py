"""Orbax checkpoints of the train state, with layout metadata checked on restore.

A checkpoint holds the train state (a pytree with ``step``, ``params`` and ``opt_state``;
``jaxformer.train.state.TrainState``) and a JSON record of the config and parameter shapes.
The batch order is a pure function of (seed, step), so the step is all the data position a
resumed run needs. Readers that want only the weights (sampling, export, ``init_from``,
analysis) restore ``params`` alone, so they need no optimizer; a converted Hugging Face model
is saved as weights only (``save_params``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.errors import UserError


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

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        meta = {**meta, "step": step, "param_layout": param_layout(state.params)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
        """A weights-only checkpoint (no optimizer state): what ``convert --from-hf`` writes."""
        meta = {**meta, "step": step, "params_only": True, "param_layout": param_layout(params)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the whole train state onto ``target``'s shapes and shardings
        (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        meta = self.read_meta(step)
        if meta.get("params_only"):
            raise CheckpointError(
                f"checkpoint step {step} holds weights only (a converted model), not a train "
                "state to resume; start a new run from it with --set train.init_from=RUN_DIR")
        _check_layout(meta, target.params, step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return restored["state"], meta

    def restore_params(self, target: Any, step: int) -> Any:
        """Only the parameters of checkpoint ``step`` (of a train state or a weights-only
        checkpoint), onto ``target``'s shapes and shardings; the optimizer state is not read."""
        _check_layout(self.read_meta(step), target, step)
        item = {"params": target}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_layout(meta: dict[str, Any], params: Any, step: int) -> None:
    """A one-line CheckpointError naming the first parameter whose shape differs."""
    expected = param_layout(params)
    found = meta.get("param_layout", {})
    if found == expected:
        return
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise CheckpointError(
                f"checkpoint step {step} does not fit the model: parameter {name} "
                f"expected shape {expected.get(name)}, found {found.get(name)}")
