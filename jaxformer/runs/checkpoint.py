"""Orbax checkpoints of the train state, with layout metadata checked on restore.

A checkpoint holds the train state (a pytree with ``step``, ``params`` and ``opt_state``;
``jaxformer.train.state.TrainState``) and a JSON record of the config and parameter shapes.
The batch order is a pure function of (seed, step), so the step is all the data position a
resumed run needs. Readers that want only the weights (sampling, export, ``init_from``,
analysis) restore ``params`` alone, so they need no optimizer; a converted Hugging Face model
is saved as weights only (``save_params``).

Faults: orbax writes each checkpoint into a temporary directory and renames it into place, so a
process killed mid-save leaves no half checkpoint under a step's name. A finished checkpoint
that cannot be read back (a truncated, deleted or overwritten file) is skipped on restore with
a warning: training falls back to the newest readable one and moves the bad one, untouched, to
``corrupt_checkpoints/`` beside ``checkpoints/``. A save that fails (disk full, unwritable
directory) raises ``CheckpointSaveError``; the checkpoints written before it stay intact.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that does not fit the model being restored, or that cannot be read."""


class CheckpointSaveError(UserError):
    """A checkpoint that could not be written (disk full, file-size limit, unwritable dir)."""


CORRUPT_DIR = "corrupt_checkpoints"  # beside the checkpoints directory


def param_layout(params: Any) -> dict[str, list[int]]:
    """{"blocks/0/attn/w_q": [256, 4, 64], ...}: what a checkpoint must match."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
            for path, leaf in flat}


class Checkpointer:
    """Saves every ``every`` steps (and on demand), keeps the latest ``keep``; with
    ``async_save`` the files are written in the background while training goes on."""

    def __init__(self, directory: Path, keep: int, *, async_save: bool = True,
                 create: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=async_save),
        )
        self.pending_step: int | None = None  # an async save not yet known to be durable

    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether ``directory`` holds at least one finished checkpoint (creates nothing)."""
        directory = Path(directory)
        return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Starts writing ``state`` (returns once it is copied off the devices when async).
        Raises CheckpointSaveError for this save or an earlier async one that failed."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        meta = {**meta, "step": step, "param_layout": param_layout(state.params)}
        self._guarded(step, lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))))
        self.pending_step = step

    def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
        """A weights-only checkpoint (no optimizer state): what ``convert --from-hf`` writes."""
        meta = {**meta, "step": step, "params_only": True, "param_layout": param_layout(params)}
        self._guarded(step, lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta))))
        self.pending_step = step

    def check(self) -> None:
        """Raises CheckpointSaveError if an async save has failed since (does not wait)."""
        self._guarded(self.pending_step, self.manager.check_for_errors)

    def _guarded(self, step: int | None, action: Callable[[], Any]) -> None:
        # orbax reports a failed background write at the next save, check or wait; the
        # error names the step that failed, which may be an earlier one than ``step``.
        failed = self.pending_step if self.pending_step is not None else step
        try:
            action()
        except Exception as e:  # tensorstore and the OS raise several types; all mean this
            self.pending_step = None
            raise CheckpointSaveError(
                f"could not write checkpoint step {failed} to {self.directory} "
                f"({_one_line(e)}); the checkpoints before it are intact "
                f"(steps {self._finished_steps(exclude=failed) or 'none'})") from e

    def _finished_steps(self, exclude: int | None) -> list[int]:
        self.manager.reload()
        return [s for s in self.steps() if s != exclude]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, target: Any, step: int | None = None, *,
                warn: Callable[[str], None] = print, move_corrupt: bool = True
                ) -> tuple[Any, dict]:
        """Restores the whole train state onto ``target``'s shapes and shardings
        (ShapeDtypeStructs): from ``step``, or from the newest checkpoint that reads back
        whole. Unreadable newer ones are reported with ``warn`` and, with ``move_corrupt``,
        moved to ``corrupt_checkpoints/`` so that the run writes a good one in their place."""
        def read(s: int) -> tuple[Any, dict]:
            meta = self.read_meta(s)
            if meta.get("params_only"):
                raise CheckpointError(
                    f"checkpoint step {s} holds weights only (a converted model), not a train "
                    "state to resume; start a new run from it with --set train.init_from=RUN_DIR")
            _check_layout(meta, target.params, s)
            restored = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
            return restored["state"], meta

        return self._first_readable(read, step, warn, move_corrupt)

    def restore_params(self, target: Any, step: int | None = None, *,
                       warn: Callable[[str], None] = print) -> Any:
        """Only the parameters of checkpoint ``step`` (default: the newest readable one; of a
        train state or a weights-only checkpoint), onto ``target``'s shapes and shardings; the
        optimizer state is not read. Nothing on disk is changed."""
        def read(s: int) -> Any:
            _check_layout(self.read_meta(s), target, s)
            item = {"params": target}
            restored = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True)))
            return restored["state"]["params"]

        return self._first_readable(read, step, warn, move_corrupt=False)

    def _first_readable(self, read: Callable[[int], Any], step: int | None,
                        warn: Callable[[str], None], move_corrupt: bool) -> Any:
        if step is not None:
            try:
                return read(step)
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore/json raise many types for bad files
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is "
                                      f"unreadable ({_one_line(e)})") from e
        bad: list[str] = []
        for s in reversed(self.steps()):
            try:
                result = read(s)
            except CheckpointError:
                raise
            except Exception as e:
                note = f"checkpoint step {s} in {self.directory} is unreadable ({_one_line(e)})"
                if move_corrupt:
                    note += f"; moved to {self._move_aside(s)}"
                warn(f"warning: {note}; trying an older one")
                bad.append(str(s))
                continue
            if bad:
                warn(f"warning: restored checkpoint step {s} instead of the unreadable "
                     f"step(s) {', '.join(bad)}")
            return result
        raise CheckpointError(f"no readable checkpoint in {self.directory}"
                              + (f" (unreadable: steps {', '.join(bad)})" if bad else ""))

    def _move_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` out of the manager's directory (never deletes it)."""
        corrupt = self.directory.parent / CORRUPT_DIR
        dest = corrupt / str(step)
        n = 1
        while dest.exists():
            dest, n = corrupt / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            corrupt.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxformer-corrupt-{step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self._guarded(self.pending_step, self.manager.wait_until_finished)
        self.pending_step = None

    def close(self) -> None:
        """Waits for the last save; raises CheckpointSaveError if it failed."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message``, at most ~200 characters; an OS error reported by
    tensorstore (``... [os_error_code='28']``, after a path or two) as the OS names it."""
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
        return f"OSError: [Errno {code[1]}] {os.strerror(int(code[1]))}"
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
