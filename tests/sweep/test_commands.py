"""``jaxformer sweep`` / ``jaxformer runs`` without training: errors, --dry-run, --emit, the
runs table of run dirs in every state, and how parallel points split the machine."""

from __future__ import annotations

import csv
import math
import subprocess

import pytest

from jaxformer import config as config_lib
from jaxformer.cli import main
from jaxformer.config import Config
from jaxformer.runs import rundir
from jaxformer.sweep.runner import ATTEMPT_MARK, EXIT_MARK, slot_env
from jaxformer.sweep.table import (
    COLUMNS,
    CONSOLE_OVERRIDES_WIDTH,
    RunRow,
    collect_runs,
    format_markdown,
    format_text,
)
from tests.command_line import snapshot
from tests.sweep.helpers import write_experiment

THREE = 'grid(**{"train.lr": [0.001, 0.003, 0.01]})'


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("sweep, sets, needles", [
    ('[{"train.lrr": 0.1}]', [], ["unknown config key 'train.lrr'", "did you mean 'train.lr'"]),
    ("[]", [], ["empty"]),
    ('{"train.lr": 0.1}', [], ["sweep() returned dict"]),
    ("None", [], ["sweep() returned NoneType"]),
    (THREE, ["--set", "train.lr=0.5"], ["conflicting overrides", "train.lr"]),
    ('[{"train.steps": "ten"}]', [], ["train.steps", "'ten'"]),
    ('[{"train.lr": 0.1}, {"train.lr": 0.1}]', [], ["duplicates"]),
    (THREE, ["--set", "train.stepz=3"], ["unknown config key 'train.stepz'"]),
])
def test_bad_sweep_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, sweep, sets,
                                                          needles):
    path = write_experiment(tmp_path / "exp.py", sweep)
    sweep_dir = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", str(path), *sets, "--sweep-dir", str(sweep_dir))
    assert_one_line_error(code, err, *needles)
    assert not sweep_dir.exists()


def test_dry_run_lists_points_and_runs_nothing(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp.py", THREE)
    sweep_dir = tmp_path / "sweep"
    code, out, _ = run_cli(capsys, "sweep", str(path), "--sweep-dir", str(sweep_dir),
                           "--dry-run")
    assert code == 0
    for name, lr in (("lr=0.001", "0.001"), ("lr=0.003", "0.003"), ("lr=0.01", "0.01")):
        assert str(sweep_dir / name) in out and f"train.lr={lr}" in out
    assert out.count("not started") == 3
    assert not sweep_dir.exists()


def test_dry_run_shows_every_override_each_point_trains_with(tmp_path, capsys):
    """The command line's --set and the point's own, in the order `jaxformer train` gets them
    (a value with spaces quoted as a shell would need it)."""
    path = write_experiment(tmp_path / "exp.py", THREE)
    sweep_dir = tmp_path / "sweep"
    code, out, _ = run_cli(capsys, "sweep", str(path), "--set", "train.steps=3",
                           "--set", 'sample.prompts=["a b"]', "--sweep-dir", str(sweep_dir),
                           "--dry-run")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(lines) == 3
    for line, lr in zip(lines, ("0.001", "0.003", "0.01"), strict=True):
        assert (f"  train.steps=3 'sample.prompts=[\"a b\"]' train.lr={lr}  (not started)"
                in line), line
    assert not sweep_dir.exists()


def test_default_sweep_dir_is_runs_name_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path / "exp.py", THREE)
    code, out, _ = run_cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 0 and "runs/tiny_sweep/lr=0.001" in out


def test_emit_slurm_is_a_job_array_with_one_task_per_point(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp.py", THREE)
    sweep_dir = tmp_path / "sweep"
    code, out, _ = run_cli(capsys, "sweep", str(path), "--set", "train.steps=3", "--sweep-dir",
                           str(sweep_dir), "--emit", "slurm")
    assert code == 0 and "sbatch" in out
    script = sweep_dir / "sweep.slurm"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "$SLURM_ARRAY_TASK_ID" in text
    assert text.count("srun jaxformer train") == 3
    for i, lr in enumerate(("0.001", "0.003", "0.01")):
        assert f"  {i})" in text
        assert f"--set train.steps=3 --set train.lr={lr} --run-dir {sweep_dir}/lr={lr}" in text
    assert (sweep_dir / "sweep.json").is_file()
    assert not any(p.is_dir() for p in sweep_dir.iterdir())  # nothing trained


def test_emit_tpu_runs_points_in_turn_on_all_workers(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp.py", THREE)
    sweep_dir = tmp_path / "sweep"
    code, _, _ = run_cli(capsys, "sweep", str(path), "--sweep-dir", str(sweep_dir),
                         "--emit", "tpu")
    assert code == 0
    script = sweep_dir / "sweep_tpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "gcloud compute tpus tpu-vm ssh" in text and "--worker=all" in text
    assert text.count("\nrun_point 'jaxformer train") == 3


def fake_run(directory, cfg: Config, checkpoint_steps=(), log: str | None = None):
    directory.mkdir(parents=True)
    rundir.write_config(directory, cfg)
    for step in checkpoint_steps:
        (directory / rundir.CHECKPOINT_DIR / str(step)).mkdir(parents=True)
    if log is not None:
        (directory / "train.log").write_text(log)


def test_runs_table_states_without_a_sweep_file(tmp_path, capsys):
    base = config_lib.apply_overrides(Config(), ["train.steps=4"])
    fake_run(tmp_path / "done", config_lib.apply_overrides(base, ["train.lr=0.1"]), [2, 4])
    fake_run(tmp_path / "crashed", config_lib.apply_overrides(base, ["train.lr=0.2"]), [2],
             log=f"{ATTEMPT_MARK} x\nstep 2\nerror: out of memory\n{EXIT_MARK} 2\n")
    fake_run(tmp_path / "resumed_ok", config_lib.apply_overrides(base, ["train.lr=0.3"]), [2],
             log=f"{ATTEMPT_MARK} x\nerror: boom\n{EXIT_MARK} 2\n{ATTEMPT_MARK} y\nstep 2\n")
    fake_run(tmp_path / "new", config_lib.apply_overrides(base, ["train.lr=0.4"]))
    rows = {r.run: r for r in collect_runs(tmp_path)}
    assert rows["done"].status == "finished" and rows["done"].steps == 4
    assert rows["crashed"].status == "failed"
    assert rows["resumed_ok"].status == "partial 2/4"  # only the last attempt counts
    assert rows["new"].status == "not started" and rows["new"].steps == 0
    assert rows["done"].overrides == "train.lr=0.1"  # the keys that differ between runs
    before = snapshot(tmp_path)
    code, out, _ = run_cli(capsys, "runs", str(tmp_path))
    assert code == 0 and "partial 2/4" in out
    assert snapshot(tmp_path) == before  # reading runs writes nothing into them
    assert format_markdown(list(rows.values())).count("\n") == 6


def test_runs_text_table_aligns_every_column():
    """Each cell of a text column starts where its header starts; each number ends where its
    header ends; over-long overrides are cut to the console width."""
    nan = math.nan
    rows = [RunRow("a", "train.lr=0.1", "finished", 4, 2.5, 2.75, 0.5, 12345.0),
            RunRow("a_much_longer_name", "x" * 80, "partial 2/4", 120, nan, nan, nan, nan),
            RunRow("mid", "", "not started", 0)]
    cells = [  # written out by hand: what each row must show, column by column
        ["a", "train.lr=0.1", "finished", "4", "2.5000", "2.7500", "0.5000", "12,345"],
        ["a_much_longer_name", "x" * 57 + "...", "partial 2/4", "120", "-", "-", "-", "-"],
        ["mid", "", "not started", "0", "-", "-", "-", "-"]]
    header, *lines = format_text(rows).splitlines()
    assert len(lines) == 3
    starts = [header.index(name) for name in COLUMNS]
    assert starts == sorted(starts) and starts[0] == 0
    for i, name in enumerate(COLUMNS):
        text = name in ("run", "overrides", "status")  # left-aligned; numbers right-aligned
        for line, row in zip(lines, cells, strict=True):
            cell = row[i]
            if text:
                at = starts[i]
                assert line[at:at + len(cell)] == cell, (name, line)
                assert line[at + len(cell):at + len(cell) + 1] in ("", " "), (name, line)
            else:
                end = starts[i] + len(name)
                assert line[end - len(cell):end] == cell, (name, line)
                assert line[end - len(cell) - 1] == " ", (name, line)
    assert len(lines[1].split()[1]) == CONSOLE_OVERRIDES_WIDTH


def test_runs_writes_the_table_only_on_request(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = config_lib.apply_overrides(Config(), ["train.steps=4"])
    fake_run(runs / "a", config_lib.apply_overrides(base, ["train.lr=0.1"]), [2, 4])
    fake_run(runs / "b", config_lib.apply_overrides(base, ["train.lr=0.2"]), [2])
    code, out, _ = run_cli(capsys, "runs", str(runs), "--out", str(tmp_path / "t.csv"))
    assert code == 0 and "partial 2/4" in out and f"wrote {tmp_path / 't.csv'}" in out
    with open(tmp_path / "t.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["overrides"], r["status"]) for r in table] == [
        ("a", "train.lr=0.1", "finished"), ("b", "train.lr=0.2", "partial 2/4")]
    assert not (runs / "runs.csv").exists() and not (runs / "runs.md").exists()
    code, _, _ = run_cli(capsys, "runs", str(runs), "--out", str(tmp_path / "t.md"))
    assert code == 0
    assert (tmp_path / "t.md").read_text().splitlines()[0].startswith("| run | overrides |")
    code, out, _ = run_cli(capsys, "runs", str(runs), "--write")
    assert code == 0 and f"wrote {runs / 'runs.csv'} and {runs / 'runs.md'}" in out
    assert (runs / "runs.csv").read_text() == (tmp_path / "t.csv").read_text()
    code, _, err = run_cli(capsys, "runs", str(runs), "--out", str(tmp_path / "t.txt"))
    assert_one_line_error(code, err, "t.txt", ".csv or a .md")


def test_runs_of_a_directory_without_runs(tmp_path, capsys):
    code, _, err = run_cli(capsys, "runs", str(tmp_path))
    assert_one_line_error(code, err, "no run dirs")


def test_parallel_points_split_gpus_round_robin_or_cpu_threads():
    env = slot_env(1, 2, [], 8, base={"XLA_FLAGS": "--foo"})
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=1"
    gpus = ["0", "1", "2", "3"]
    assert slot_env(0, 2, gpus, 8, base={})["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert slot_env(1, 2, gpus, 8, base={})["CUDA_VISIBLE_DEVICES"] == "1,3"
    shared = slot_env(1, 2, ["0"], 8, base={})
    assert shared["CUDA_VISIBLE_DEVICES"] == "0"
    assert shared["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"
    alone = slot_env(0, 1, gpus, 8, base={"A": "b"})
    assert "CUDA_VISIBLE_DEVICES" not in alone and alone["A"] == "b"


def test_a_run_whose_lock_names_a_live_process_is_running(tmp_path, capsys):
    """`runs` and `sweep --dry-run` say "running" while a trainer holds the run dir's lock
    (before its first checkpoint it looked "not started"); a lock file a killed process left
    behind, or none, does not count."""
    import json
    import socket

    from jaxformer.runs.lock import LOCK_FILE, RunLock

    path = write_experiment(tmp_path / "exp.py", THREE)
    sweep_dir = tmp_path / "sweep"
    base = config_lib.apply_overrides(Config(), ["train.steps=4"])
    for name, lr in (("lr=0.001", 0.001), ("lr=0.003", 0.003), ("lr=0.01", 0.01)):
        fake_run(sweep_dir / name, config_lib.apply_overrides(base, [f"train.lr={lr}"]))
    lock = RunLock.acquire(sweep_dir / "lr=0.001")  # as a trainer does, in this live process
    gone = subprocess.Popen(["true"])  # a pid that has exited
    gone.wait()
    (sweep_dir / "lr=0.003" / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "since": "2026-01-01 00:00:00"}))
    try:
        rows = {r.run: r.status for r in collect_runs(sweep_dir)}
        assert rows == {"lr=0.001": "running", "lr=0.003": "not started",
                        "lr=0.01": "not started"}
        code, out, _ = run_cli(capsys, "sweep", str(path), "--sweep-dir", str(sweep_dir),
                               "--dry-run")
        assert code == 0 and out.count("(running)") == 1 and out.count("(not started)") == 2
    finally:
        lock.release()
    assert collect_runs(sweep_dir)[0].status == "not started"  # released: free again


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`jaxformer sweep ... --dry-run | head -1`: no traceback when the pipe closes."""
    import sys

    path = write_experiment(tmp_path / "exp.py", THREE)
    proc = subprocess.Popen([sys.executable, "-c", "from jaxformer.cli import run; run()",
                             "sweep", str(path), "--sweep-dir", str(tmp_path / "s"),
                             "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "Broken" not in err, err
