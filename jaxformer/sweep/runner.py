"""Runs the points of a sweep locally, each as its own ``jaxformer train`` process.

One point's crash does not stop the others; its output is in ``<run dir>/train.log``. Finished
points are skipped and interrupted ones resume (``jaxformer train`` resumes a run dir), so
running the same sweep command again completes what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import jaxformer
from jaxformer.errors import UserError
from jaxformer.runs import rundir
from jaxformer.sweep.hparams import write_sweep_hparams
from jaxformer.sweep.space import Point, Sweep

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
# Each attempt appends to train.log between these lines (the runs table reads the last one).
ATTEMPT_MARK = "==> jaxformer sweep: attempt"
EXIT_MARK = "==> jaxformer sweep: exit status"


def default_sweep_dir(sweep: Sweep) -> Path:
    return Path("runs") / f"{sweep.base.name}_sweep"


def checkpoint_step(run_dir: Path) -> int:
    """The latest checkpointed step of a run dir (0 if none); checkpoint dirs are named by step."""
    directory = Path(run_dir) / rundir.CHECKPOINT_DIR
    if not directory.is_dir():
        return 0
    return max((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
               default=0)


def train_command(sweep: Sweep, point: Point, run_dir: Path | str, program: list[str]
                  ) -> list[str]:
    """``program train EXP --set ... --run-dir DIR --no-progress`` for one point."""
    sets = [*sweep.base_overrides, *point.args]
    return [*program, "train", str(sweep.experiment), *[a for s in sets for a in ("--set", s)],
            "--run-dir", str(run_dir), "--no-progress"]


def write_sweep_file(sweep: Sweep, sweep_dir: Path) -> Path:
    """``sweep_dir/sweep.json``: the experiment, the shared overrides and every point."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "experiment": str(sweep.experiment.resolve()),
        "base_overrides": list(sweep.base_overrides),
        "points": [{"name": p.name, "run_dir": p.name, "args": p.args,
                    "overrides": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in p.overrides.items()},
                    "steps": p.cfg.train.steps} for p in sweep.points],
    }
    path = sweep_dir / SWEEP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


# --- devices ---------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids to hand out: $CUDA_VISIBLE_DEVICES if set, else ``nvidia-smi -L``'s, else []."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def slot_env(slot: int, parallel: int, gpus: list[str], cpus: int,
             base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the process in ``slot`` (0..parallel-1).

    With one slot the environment is unchanged. Otherwise, on GPUs each slot gets every
    ``parallel``-th GPU (slots share a GPU when there are fewer GPUs than slots, and then split
    its memory); on the CPU each slot gets one device and ``cpus // parallel`` threads.
    """
    env = dict(os.environ if base is None else base)
    package_root = str(Path(jaxformer.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if parallel <= 1:
        return env
    if gpus:
        mine = gpus[slot::parallel] or [gpus[slot % len(gpus)]]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        sharing = -(-parallel // len(gpus)) if len(gpus) < parallel else 1
        if sharing > 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.2f}"
        return env
    threads = str(max(1, cpus // parallel))
    env["OMP_NUM_THREADS"] = threads
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    return env


# --- running ---------------------------------------------------------------------------------


def run_sweep(sweep: Sweep, sweep_dir: Path, parallel: int = 1,
              echo: Callable[[str], None] = print,
              program: list[str] | None = None) -> dict[str, str]:
    """Runs every unfinished point; returns {point name: finished | skipped | failed}."""
    if parallel < 1:
        raise UserError("--parallel must be at least 1")
    program = program or [sys.executable, "-m", "jaxformer.cli"]
    sweep_dir = Path(sweep_dir)
    write_sweep_file(sweep, sweep_dir)
    write_sweep_hparams(sweep, sweep_dir)
    total = len(sweep.points)
    results: dict[str, str] = {}
    todo: list[Point] = []
    for point in sweep.points:
        done, steps = checkpoint_step(sweep_dir / point.name), point.cfg.train.steps
        if done >= steps:
            echo(f"[{point.index + 1}/{total}] skipped {point.name}: finished "
                 f"(step {done}/{steps})")
            results[point.name] = "skipped"
        else:
            todo.append(point)
    gpus = visible_gpus()
    cpus = os.cpu_count() or 1
    running: dict[int, tuple[Point, subprocess.Popen, float, TextIO]] = {}  # slot -> process
    try:
        while todo or running:
            free = [s for s in range(parallel) if s not in running]
            while todo and free:
                slot, point = free.pop(0), todo.pop(0)
                running[slot] = _start(sweep, point, sweep_dir, program,
                                       slot_env(slot, parallel, gpus, cpus), total, echo)
            for slot, (point, proc, start, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                _finish(log, code)
                results[point.name] = _report(point, sweep_dir, code, time.time() - start,
                                              total, echo)
            if running:
                time.sleep(0.2)
    except KeyboardInterrupt:
        # The children got the same Ctrl-C; they save a checkpoint and exit.
        for _, proc, _, log in running.values():
            _finish(log, proc.wait())
        raise UserError(f"sweep interrupted; checkpoints are saved in {sweep_dir}; run the same "
                        "command again to finish it") from None
    return {p.name: results[p.name] for p in sweep.points}


def _start(sweep: Sweep, point: Point, sweep_dir: Path, program: list[str],
           env: dict[str, str], total: int, echo: Callable[[str], None]
           ) -> tuple[Point, subprocess.Popen, float, TextIO]:
    run_dir = (sweep_dir / point.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = checkpoint_step(run_dir)
    note = f", resuming from step {done}" if done else ""
    echo(f"[{point.index + 1}/{total}] running {point.name} ({point.cfg.train.steps} steps"
         f"{note}) -> {run_dir / LOG_FILE}")
    cmd = train_command(sweep, point, run_dir, program)
    log = open(run_dir / LOG_FILE, "a", buffering=1)  # noqa: SIM115 (closed in _finish)
    log.write(f"{ATTEMPT_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"{' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
    return point, proc, time.time(), log


def _finish(log: TextIO, code: int) -> None:
    log.write(f"{EXIT_MARK} {code}\n")
    log.close()


def _report(point: Point, sweep_dir: Path, code: int, seconds: float, total: int,
            echo: Callable[[str], None]) -> str:
    run_dir = sweep_dir / point.name
    done, steps = checkpoint_step(run_dir), point.cfg.train.steps
    prefix = f"[{point.index + 1}/{total}]"
    if code == 0 and done >= steps:
        echo(f"{prefix} finished {point.name} in {seconds:.0f} s")
        return "finished"
    last = _last_error(run_dir / LOG_FILE)
    echo(f"{prefix} failed {point.name} (exit status {code}, step {done}/{steps}): {last}; "
         f"see {run_dir / LOG_FILE}")
    return "failed"


def _last_error(log: Path) -> str:
    """The most telling line of the last attempt's output."""
    lines = [line for line in last_attempt(log).splitlines()
             if line.strip() and not line.startswith("==> ")]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def last_attempt(log: Path) -> str:
    """The text train.log holds for its last attempt ('' if there is no log)."""
    if not log.is_file():
        return ""
    text = log.read_text(errors="replace")
    at = text.rfind(ATTEMPT_MARK)
    return text[at:] if at >= 0 else text
