"""A real multi-process job on this machine: 2 processes x 2 fake CPU devices joined by
jax.distributed (gloo), launched through scripts/launch_local.py with the FSDP preset.

Process 1 alone gets SIGTERM after step 5 (``tests/crash_train.py``), as a scheduler preempting
one host would: both processes agree to stop at that step, save a step-5 checkpoint together and
exit with status 75. Relaunched, the job resumes from step 5 and finishes; its per-step train
losses and final eval loss equal those of one process driving the same 4-device mesh, and only
process 0 wrote anything into the run dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer.analysis.events import read_scalars
from tests.corpus import write_corpus
from tests.parallel.fake_devices import FAST_COMPILE, compile_cache_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = str(ROOT / "experiments" / "gpt_tiny.py")
STEPS = 8
CRASH_AFTER = 5
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "model.max_len=32", "data.seq_len=32", "train.batch_size=8", f"train.steps={STEPS}",
        "train.warmup_steps=1", "log.every=1", "eval.every=4", "eval.batches=2",
        "checkpoint.every=4", "mesh.preset=fsdp", "sample.count=0"]
REL = 1e-5  # fp32: the same program, partitioned over processes instead of one


def _env(**extra: str) -> dict[str, str]:
    # launch_local.py appends each process's device count to these flags.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE,
            **extra}


def _train_args(corpus: Path, run_dir: Path, fault: str | None = None) -> list[str]:
    sets = [a for kv in [*TINY, f"data.source={corpus}"] for a in ("--set", kv)]
    command = (["-m", "jaxformer.cli"] if fault is None else
               ["-m", "tests.crash_train", fault])
    return [sys.executable, *command, "train", EXPERIMENT, "--run-dir", str(run_dir),
            "--no-progress", *sets]


def _launch(corpus: Path, run_dir: Path, log_dir: Path, fault: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--num-processes", "2",
           "--devices-per-process", "2", "--log-dir", str(log_dir), "--",
           *_train_args(corpus, run_dir, fault)]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=300)


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multiprocess")
    corpus = write_corpus(tmp / "corpus", n_docs=40)
    run = tmp / "multi"
    out: dict = {"run": run, "tmp": tmp}
    # The relaunch compiles the programs the first launch compiled: it loads them instead.
    env = _env(**compile_cache_env(tmp / "jax-cache"))

    crashed = _launch(corpus, run, tmp / "logs_1", fault=f"{CRASH_AFTER}:SIGTERM:1", env=env)
    out["crashed"] = crashed
    out["crashed_files"] = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    out["crashed_events"] = _event_files(run)
    out["crashed_checkpoints"] = (sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                                         if p.name.isdigit())
                                  if (run / "checkpoints").is_dir() else [])

    resumed = _launch(corpus, run, tmp / "logs_2", env=env)
    out["resumed"] = resumed
    out["resumed_events"] = _event_files(run)

    single = subprocess.run(
        _train_args(corpus, tmp / "single"), cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=_env(XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=4"))
    assert single.returncode == 0, single.stderr[-3000:]
    out["single"] = single
    out["multi_scalars"] = read_scalars(run) if out["resumed_events"] else {}
    out["single_scalars"] = read_scalars(tmp / "single")
    print("multi-process:", {k: v for k, v in out["multi_scalars"].items()
                             if k in ("train/loss", "eval/loss")})
    print("single process:", {k: v for k, v in out["single_scalars"].items()
                              if k in ("train/loss", "eval/loss")})
    return out


def test_sigterm_to_one_process_stops_both_at_step_5_with_a_checkpoint(runs):
    crashed = runs["crashed"]
    assert crashed.returncode == 75, (crashed.returncode, crashed.stderr[-3000:])
    assert "launch_local: exit status 75" in crashed.stderr
    assert runs["crashed_checkpoints"] == [4, 5], runs["crashed_checkpoints"]
    assert f"step {CRASH_AFTER:>6} |" in crashed.stdout  # process 0 got through step 5
    assert f"step {CRASH_AFTER + 1:>6} |" not in crashed.stdout
    assert f"stopped by SIGTERM at step {CRASH_AFTER}" in crashed.stderr
    # Process 1, which got the signal, stopped at the same step, cleanly.
    log_1 = (runs["tmp"] / "logs_1" / "process_1.log").read_text()
    assert "Traceback" not in log_1, log_1[-3000:]
    assert f"stopped by SIGTERM at step {CRASH_AFTER}" in log_1


def test_relaunch_resumes_from_step_5_and_finishes(runs):
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {runs['run']} from step {CRASH_AFTER}" in resumed.stdout
    assert f"done: step {STEPS}" in resumed.stdout
    assert "over 2 process(es)" in resumed.stdout and "mesh fsdp=4" in resumed.stdout
    ckpts = sorted(int(p.name) for p in (runs["run"] / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert ckpts[-1] == STEPS


def test_only_process_0_writes(runs):
    # One event file per invocation (process 1's Reporter is disabled), config and tokenizer
    # written once, and process 1 printed no training lines.
    assert len(runs["crashed_events"]) == 1, runs["crashed_files"]
    assert len(runs["resumed_events"]) == 2, runs["resumed_events"]
    names = sorted(p.name for p in runs["run"].iterdir())
    assert [n for n in names if not n.startswith("events.out.tfevents.")] == [
        ".lock", "checkpoints", "config.json", "data.json", "tokenizer.json"], names
    for log_dir in ("logs_1", "logs_2"):
        log = (runs["tmp"] / log_dir / "process_1.log").read_text()
        assert not re.search(r"^step +\d+ \|", log, re.M), log[-2000:]
        assert "resumed" not in log and "done:" not in log, log[-2000:]


def test_train_losses_match_one_process_at_every_step(runs):
    multi = dict(runs["multi_scalars"].get("train/loss", []))
    single = dict(runs["single_scalars"]["train/loss"])
    assert sorted(single) == list(range(1, STEPS + 1))
    # Steps 1..5 come from the crashed invocation's event file (step 5 again from the
    # relaunch, which replaces it), 5..8 from the relaunch's.
    assert sorted(multi) == list(range(1, STEPS + 1)), (
        f"multi-process event files hold train/loss of steps {sorted(multi)}; the crashed "
        "invocation's steps are missing (its event file was not flushed before the exit)")
    for s in range(1, STEPS + 1):
        assert abs(multi[s] - single[s]) <= REL * abs(single[s]), (s, multi, single)
    assert len(set(single.values())) == STEPS  # the steps change the parameters


def test_final_eval_loss_matches_one_process(runs):
    multi = dict(runs["multi_scalars"]["eval/loss"])
    single = dict(runs["single_scalars"]["eval/loss"])
    assert STEPS in multi and STEPS in single
    assert abs(multi[STEPS] - single[STEPS]) <= REL * abs(single[STEPS]), (multi, single)
