"""kill -9 at random moments of a training run, then rerun it: does every rerun end bitwise
where the uninterrupted run ends?

    python scripts/fault_injection.py --kills 20 --steps 40 --out /tmp/faults

Trains a reference run once, then for each trial starts the same run, sends SIGKILL at a time
drawn uniformly over its training phase (from its first step line to the reference's length),
notes what the checkpoints directory held at that moment (finished steps, a save in flight),
and reruns the command to the end. A trial passes when the rerun starts from the newest
finished checkpoint and its final parameters and the losses of every step it trained equal
the reference's bit for bit. Prints one line per trial and "N/N resumed bitwise".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxformer.analysis.events import read_scalars  # noqa: E402
from jaxformer.runs.restore import load_run  # noqa: E402
from tests.corpus import write_corpus  # noqa: E402

EXPERIMENT = '''from jaxformer import config as config_lib
from jaxformer.config import Config


def config() -> Config:
    return config_lib.apply_overrides(Config(name="faults"), [
        "data.source={corpus}", "data.seq_len=32", "model.max_len=32", "model.n_layers=2",
        "model.d_model=32", "model.n_heads=2", "model.vocab_size=300", "train.batch_size=4",
        "train.steps={steps}", "train.warmup_steps=2", "checkpoint.every={every}",
        "checkpoint.keep=2", "log.every=1", "eval.every={steps}", "eval.batches=1",
        "sample.count=0"])
'''


@dataclasses.dataclass
class Trial:
    kill_after_s: float
    finished_at_kill: list[int]  # checkpoint steps on disk when the kill landed
    saving_at_kill: bool  # a save was in flight (a temporary orbax directory existed)
    killed_exit: int | None  # None: the run had already ended before the kill
    resumed_from: int | None
    bitwise: bool
    note: str = ""


def command(experiment: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "jaxformer.cli", "train", str(experiment), "--run-dir",
            str(run_dir), "--no-progress"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def train_to_end(experiment: Path, run_dir: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(command(experiment, run_dir), env=environment(), capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"training failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a step logged again after a resume keeps its last value."""
    return dict(read_scalars(run_dir)["train/loss"])


def same_params(a: Path, b: Path) -> bool:
    pa, pb = load_run(a, warn=lambda _: None)[1], load_run(b, warn=lambda _: None)[1]
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, pa, pb)))


def checkpoint_state(run_dir: Path) -> tuple[list[int], bool]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return [], False
    names = [p.name for p in directory.iterdir()]
    return sorted(int(n) for n in names if n.isdigit()), any("tmp" in n for n in names)


def kill_trial(experiment: Path, run_dir: Path, window_s: float, rng: random.Random,
               reference: Path) -> Trial:
    proc = subprocess.Popen(command(experiment, run_dir), env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # wait for the first step: setup and compilation are not faults
        if line.startswith("step "):
            break
    # Keep reading, so that a full pipe never stalls the run we are about to kill.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    delay = rng.uniform(0.0, window_s)
    time.sleep(delay)
    finished, saving = checkpoint_state(run_dir)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    killed = code if code == -signal.SIGKILL else None
    finished_after, _ = checkpoint_state(run_dir)
    out = train_to_end(experiment, run_dir)
    resumed = [line for line in out.stdout.splitlines() if line.startswith("resumed ")]
    resumed_from = int(resumed[0].rsplit(" ", 1)[1]) if resumed else None
    ref, got = losses(reference), losses(run_dir)
    notes = []
    expected_start = max(finished_after, default=None)
    if resumed_from != expected_start:
        notes.append(f"resumed from {resumed_from}, newest finished was {expected_start}")
    start = resumed_from or 0
    if any(got.get(s) != ref[s] for s in ref if s > start):
        notes.append("losses differ")
    if not same_params(run_dir, reference):
        notes.append("final parameters differ")
    return Trial(delay, finished, saving, killed, resumed_from, not notes, "; ".join(notes))


def run_trials(out: Path, kills: int, steps: int, every: int, seed: int,
               say=print) -> list[Trial]:
    out.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(out / "corpus")
    experiment = out / "faults_experiment.py"
    experiment.write_text(EXPERIMENT.format(corpus=corpus, steps=steps, every=every))
    reference = out / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.perf_counter()
    ref_out = train_to_end(experiment, reference)
    step_lines = [line for line in ref_out.stdout.splitlines() if line.startswith("step ")]
    # The training phase lasts about (total - setup); setup is most of a tiny run, so the
    # window is estimated from the step times the reference logged.
    step_times = [float(line.split("step_time_s ")[1].split()[0]) for line in step_lines
                  if "step_time_s " in line]
    window = sum(step_times) * 1.1 + 0.2
    say(f"reference: {steps} steps in {time.perf_counter() - start:.1f}s, training phase "
        f"~{sum(step_times):.2f}s; kill window {window:.2f}s after the first step line")
    rng = random.Random(seed)
    trials = []
    for i in range(kills):
        run_dir = out / f"trial_{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        trial = kill_trial(experiment, run_dir, window, rng, reference)
        trials.append(trial)
        say(f"trial {i + 1:>3}: kill at +{trial.kill_after_s:.2f}s "
            f"({'killed' if trial.killed_exit else 'already done'}; finished checkpoints "
            f"{trial.finished_at_kill}{', a save in flight' if trial.saving_at_kill else ''}) "
            f"-> resumed from {trial.resumed_from}: "
            f"{'bitwise' if trial.bitwise else 'MISMATCH: ' + trial.note}")
    ok = sum(t.bitwise for t in trials)
    during_save = sum(t.saving_at_kill for t in trials)
    say(f"{ok}/{len(trials)} resumed bitwise ({during_save} kills landed while a save was "
        f"in flight, {sum(t.killed_exit is None for t in trials)} after the run had ended)")
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=2, help="checkpoint.every")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/jaxformer_faults"))
    args = parser.parse_args()
    trials = run_trials(args.out, args.kills, args.steps, args.every, args.seed)
    sys.exit(0 if all(t.bitwise for t in trials) else 1)


if __name__ == "__main__":
    main()
