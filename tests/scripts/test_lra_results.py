"""scripts/lra_results.py reads a real (tiny) LRA-style sweep into the results table: the
final eval accuracy of the event file, steps/s from tokens/s, the majority baseline and the
step temporaries from the sweep's train.log."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

from jaxformer.analysis.events import read_scalars
from tests.command_line import jaxformer

ROOT = Path(__file__).resolve().parents[2]

EXPERIMENT = '''
import dataclasses
from jaxformer.config import load_experiment

def config():
    return load_experiment({base!r})

def sweep():
    return [{{"model.attention_type": "linear", "data.seq_len": 32, "model.max_len": 64,
             "train.steps": 4, "train.batch_size": 4, "eval.every": 4, "eval.batches": 1,
             "log.every": 2, "checkpoint.every": 4, "model.n_layers": 1, "model.d_model": 16,
             "model.n_heads": 2, "model.d_ff": 32, "model.attention_block": 16}}]
'''


def test_table_cells_come_from_the_runs(tmp_path):
    exp = tmp_path / "lra_tiny.py"
    exp.write_text(EXPERIMENT.format(base=str(ROOT / "experiments/lra_listops.py")))
    sweep_dir = tmp_path / "sweep"
    run = jaxformer("sweep", str(exp), "--sweep-dir", str(sweep_dir))
    assert run.returncode == 0, run.stderr[-2000:]
    out = subprocess.run([sys.executable, str(ROOT / "scripts/lra_results.py"), str(sweep_dir)],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| `linear`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["—"] * 4  # only ListOps ran
    assert cells[6].startswith("Linear Trans.: 16.1 / 65.9")
    acc, base, steps, mib = re.fullmatch(
        r"([0-9.]+) \(([0-9]+)\) · ([0-9.]+)/s · ([0-9.]+) MiB", cells[1]).groups()
    run_dir = next(p.parent for p in sweep_dir.rglob("config.json"))
    scalars = read_scalars(run_dir)
    assert float(acc) == round(100 * scalars["eval/accuracy"][-1][1], 1)
    assert float(steps) > 0 and float(mib) > 0 and 0 < int(base) <= 100
    log = (run_dir / "train.log").read_text()
    logged = float(re.findall(r"majority class baseline ([0-9.]+)", log)[-1])
    assert math.isclose(100 * logged, int(base), abs_tol=0.5)


def test_missing_dir_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/lra_results.py"),
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error:" in out.stderr
