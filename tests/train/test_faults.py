"""Faults injected into tiny runs: signals, a poisoned batch, an absurd learning rate, a
corrupt newest checkpoint, a failing save, a second process, changed data. Whatever happens,
a rerun of the same command continues bitwise where the uninterrupted run would be.

Signals are real: a hook sends them to this process with ``os.kill``, and the loop's handlers
(jaxformer.train.signals) take them as they would a scheduler's.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxformer import cli
from jaxformer.errors import PreemptedError, UserError
from jaxformer.runs.checkpoint import CORRUPT_DIR, CheckpointError, CheckpointSaveError
from jaxformer.runs.lock import RunLock
from jaxformer.runs.restore import load_run
from jaxformer.train import loop
from jaxformer.train.loop import train
from tests.corpus import write_corpus
from tests.train.helpers import run_config


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("faults") / "corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted 8-step run (checkpoints at 4 and 8) every fault is compared with."""
    run_dir = tmp_path_factory.mktemp("faults") / "whole"
    return train(run_config(corpus), run_dir, progress=False, echo=quiet)


class SendSignal:
    """A hook that sends ``sig`` to this process after ``step``."""

    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def after_step(self, run, step, metrics) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.sig)


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_at_the_current_step_and_the_rerun_continues_bitwise(
        corpus, reference, tmp_path, sig):
    run_dir = tmp_path / "run"
    before = signal.getsignal(sig)
    with pytest.raises(PreemptedError, match=f"stopped by {sig.name} at step 3; checkpoint "
                                             "saved") as stopped:
        train(run_config(corpus), run_dir, progress=False, echo=quiet,
              hooks=[SendSignal(3, sig)])
    assert stopped.value.exit_status == 75
    assert steps_on_disk(run_dir) == [3]  # nothing lost: step 3 is not a periodic save
    assert signal.getsignal(sig) == before  # the loop's handler is gone again
    rest = train(run_config(corpus), run_dir, progress=False, echo=quiet)
    assert rest.start_step == 3
    assert {s: rest.losses[s] for s in range(4, 9)} == {
        s: reference.losses[s] for s in range(4, 9)}


def test_sigusr1_saves_and_training_goes_on(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A lock file left by a process that no longer runs (no flock held): taken over.
    (run_dir / ".lock").write_text(json.dumps({"host": "gone", "pid": 999999, "since": "x"}))
    lines: list[str] = []
    result = train(run_config(corpus), run_dir, progress=False, echo=lines.append,
                   hooks=[SendSignal(3, signal.SIGUSR1)])
    assert result.final_step == 8 and result.losses == reference.losses
    assert steps_on_disk(run_dir) == [3, 4, 8]
    assert any("checkpoint saved (SIGUSR1)" in line for line in lines)
    assert any("took over the lock" in line and "process 999999 on host gone" in line
               for line in lines)
    assert (run_dir / ".lock").read_text() == ""  # released at the end


def test_a_second_process_on_the_run_dir_is_refused_naming_the_holder(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = RunLock.acquire(run_dir)
    try:
        with pytest.raises(UserError, match=rf"{run_dir} is in use by process {os.getpid()} "
                                            "on host"):
            train(run_config(corpus), run_dir, progress=False, echo=quiet)
    finally:
        holder.release()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written


def params_by_step(into: dict):
    class Capture:
        def after_step(self, run, step, metrics):
            into[step] = jax.device_get(run.state)
    return Capture()


def test_a_poisoned_batch_is_skipped_without_touching_the_state(corpus, tmp_path, monkeypatch):
    clean = loop.Run.train_batch

    def poisoned(self, step):
        batch = clean(self, step)
        if step == 2:  # the batch of step 3: NaN weights make its loss NaN
            batch = {**batch, "loss_weights": batch["loss_weights"] * np.nan}
        return batch

    monkeypatch.setattr(loop.Run, "train_batch", poisoned)
    states: dict = {}
    lines: list[str] = []
    result = train(run_config(corpus), tmp_path / "run", progress=False, echo=lines.append,
                   hooks=[params_by_step(states)])
    assert result.final_step == 8
    same = jax.tree.map(np.array_equal, (states[2].params, states[2].opt_state),
                        (states[3].params, states[3].opt_state))
    assert all(jax.tree.leaves(same)), "the skipped step changed the parameters or moments"
    assert int(states[3].step) == 3  # the step (and so the batch order) moves on
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), states[4].params,
                         states[3].params)
    assert all(jax.tree.leaves(moved)), "the next step trains again"
    assert all(math.isfinite(v) for s, v in result.losses.items() if s != 3)
    assert any("step(s) 3 had a non-finite loss" in line for line in lines)


def test_an_absurd_learning_rate_stops_with_exit_3_and_finite_checkpoints(corpus, tmp_path,
                                                                         capsys):
    run_dir = tmp_path / "run"
    experiment = tmp_path / "exp.py"
    experiment.write_text("from tests.train.helpers import run_config\n\n"
                          f"def config():\n    return run_config({corpus!r})\n")
    status = cli.main(["train", str(experiment), "--run-dir", str(run_dir), "--no-progress",
                       "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
                       "--set", "train.max_bad_steps=2", "--set", "checkpoint.every=1"])
    err = capsys.readouterr().err
    assert status == 3, err
    assert err.count("error:") == 1 and "training diverged" in err
    steps = steps_on_disk(run_dir)
    assert steps, "the checkpoints before and during the bad steps are kept"
    _, params = load_run(run_dir)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def corrupt(step_dir: Path, how: str) -> Path:
    """Truncates every array data file of a checkpoint to half, or deletes the database
    manifest that indexes them; -> the (last) file changed."""
    if how == "delete":
        manifest = step_dir / "state" / "manifest.ocdbt"
        manifest.unlink()
        return manifest
    for data in (step_dir / "state").glob("ocdbt.process_*/d/*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return data


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, corpus, tmp_path,
                                                                   capsys, how):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    bad = corrupt(run_dir / "checkpoints" / "8", how)
    rel = bad.relative_to(run_dir / "checkpoints" / "8")
    # Read-only commands fall back too, and change nothing on disk.
    warnings: list[str] = []
    load_run(run_dir, warn=warnings.append)
    assert "checkpoint step 8" in warnings[0] and "unreadable" in warnings[0]
    with pytest.raises(CheckpointError, match="checkpoint step 8 .* is unreadable"):
        load_run(run_dir, step=8)
    assert steps_on_disk(run_dir) == [4, 8]
    if how == "truncate":  # the same through the command a user runs
        assert cli.main(["sample", str(run_dir), "--max-new-tokens", "3"]) == 0
        assert "warning: checkpoint step 8" in capsys.readouterr().err
        assert cli.main(["sample", str(run_dir), "--step", "8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "checkpoint step 8" in err and "unreadable" in err

    lines: list[str] = []
    rest = train(run_config(corpus), run_dir, progress=False, echo=lines.append)
    assert rest.start_step == 4
    assert {s: rest.losses[s] for s in range(5, 9)} == {
        s: reference.losses[s] for s in range(5, 9)}
    assert any("checkpoint step 8" in line and f"moved to {run_dir / CORRUPT_DIR / '8'}" in line
               for line in lines)
    moved = run_dir / CORRUPT_DIR / "8"
    assert (moved / rel).exists() == (how == "truncate")  # kept as it was, never deleted
    assert steps_on_disk(run_dir) == [4, 8]  # a good step 8 written in its place


class LimitFileSize:
    """After ``step``: files of this process may not grow past ``limit`` bytes (the soft
    RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    def __init__(self, step: int, limit: int):
        self.step, self.limit = step, limit

    def after_step(self, run, step, metrics) -> None:
        if step == self.step:
            run.ckpt.wait()
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.hard))

    def __enter__(self):
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.soft, self.hard))


def test_a_full_disk_stops_with_one_line_and_the_earlier_checkpoints_resume(corpus, reference,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    with LimitFileSize(5, 20_000) as limit, pytest.raises(CheckpointSaveError) as failed:
        train(run_config(corpus), run_dir, progress=False, echo=quiet, hooks=[limit])
    message = str(failed.value)
    assert "\n" not in message and "could not write checkpoint step 8" in message
    assert "File too large" in message and "intact (steps [4])" in message
    assert steps_on_disk(run_dir) == [4]
    rest = train(run_config(corpus), run_dir, progress=False, echo=quiet)
    assert rest.start_step == 4
    assert {s: rest.losses[s] for s in range(5, 9)} == {
        s: reference.losses[s] for s in range(5, 9)}


def test_on_error_retry_trains_on_and_saves_at_the_next_interval(corpus, reference, tmp_path,
                                                                monkeypatch):
    from jaxformer.runs import checkpoint

    real_save = checkpoint.ocp.CheckpointManager.save

    def full_once(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_once)
    lines: list[str] = []
    result = train(run_config(corpus, "checkpoint.on_error=retry"), tmp_path / "run",
                   progress=False, echo=lines.append)
    assert result.losses == reference.losses
    assert steps_on_disk(tmp_path / "run") == [8]
    assert any("could not write checkpoint step 4" in line and "No space left" in line
               and "on_error=retry" in line for line in lines)


def test_a_changed_data_source_is_refused_on_resume(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=30)
    cfg = run_config(str(corpus))
    train(cfg, tmp_path / "run", stop_at=2, progress=False, echo=quiet)
    (corpus / "zz_new.py").write_text("def added():\n    return 1\n")
    with pytest.raises(UserError, match=r"1 file added \(zz_new.py\).*--allow-data-change"):
        train(cfg, tmp_path / "run", progress=False, echo=quiet)
