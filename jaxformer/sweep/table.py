"""``jaxformer runs DIR``: one row per run dir under DIR, from its config and event files.

Printed as aligned text; written on request as CSV (full precision) or markdown (``--out
FILE``, or ``--write`` for ``DIR/runs.csv`` and ``DIR/runs.md``, as a sweep does at its end).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
from pathlib import Path

from jaxformer import config as config_lib
from jaxformer.analysis.events import read_scalars
from jaxformer.errors import UserError
from jaxformer.runs import rundir
from jaxformer.runs.lock import live_holder
from jaxformer.sweep.runner import EXIT_MARK, LOG_FILE, SWEEP_FILE, checkpoint_step, last_attempt

CSV_FILE = "runs.csv"
MD_FILE = "runs.md"
COLUMNS = ("run", "overrides", "status", "steps", "best_eval_loss", "final_eval_loss",
           "final_eval_accuracy", "median_tokens_per_sec")


@dataclasses.dataclass
class RunRow:
    run: str  # the run dir, relative to the listed directory
    overrides: str  # "train.lr=0.001 train.seed=1"
    status: str  # finished | running | partial k/N | failed | not started
    steps: int  # the latest checkpointed step
    best_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    final_eval_accuracy: float = math.nan
    median_tokens_per_sec: float = math.nan


def find_run_dirs(directory: Path) -> list[Path]:
    """Every directory at or below ``directory`` holding a config.json, in sorted order."""
    found = []
    for path in sorted(Path(directory).rglob(rundir.CONFIG_FILE)):
        if rundir.CHECKPOINT_DIR not in path.relative_to(directory).parts:
            found.append(path.parent)
    return found


def _sweep_overrides(directory: Path) -> dict[Path, tuple[int, str]]:
    """{run dir: (position, overrides text)} of the points of every sweep.json below DIR."""
    out: dict[Path, tuple[int, str]] = {}
    for sweep_file in sorted(Path(directory).rglob(SWEEP_FILE)):
        try:
            data = json.loads(sweep_file.read_text())
            for i, point in enumerate(data["points"]):
                out[(sweep_file.parent / point["run_dir"]).resolve()] = (i, " ".join(
                    point["args"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{sweep_file} is not a readable sweep file: {e}") from e
    return out


def _varying_keys(configs: list[config_lib.Config]) -> list[str]:
    """The config keys whose values differ between the runs (the name aside)."""
    if len(configs) < 2:
        return []
    return [k for k in config_lib.all_keys(configs[0]) if k != "name"
            and len({repr(config_lib.get_key(c, k)) for c in configs}) > 1]


def failed(run_dir: Path) -> bool:
    """Whether the last attempt in train.log ended with an error."""
    text = last_attempt(Path(run_dir) / LOG_FILE)
    exit_code = re.search(re.escape(EXIT_MARK) + r" (-?\d+)", text)
    if exit_code is not None:
        return int(exit_code.group(1)) != 0
    return "Traceback (most recent call last)" in text or any(
        line.startswith("error:") for line in text.splitlines())


def run_row(run_dir: Path, name: str, overrides: str) -> RunRow:
    cfg = rundir.read_config(run_dir)
    total = cfg.train.steps if cfg is not None else 0
    done = checkpoint_step(run_dir)
    if total and done >= total:
        status = "finished"
    elif live_holder(run_dir) is not None:
        status = "running"
    elif failed(run_dir):
        status = "failed"
    elif done:
        status = f"partial {done}/{total}"
    else:
        status = "not started"
    row = RunRow(name, overrides, status, done)
    if not any(Path(run_dir).glob("events.out.tfevents.*")):
        return row
    scalars = read_scalars(run_dir)
    if scalars.get("eval/loss"):
        losses = [v for _, v in scalars["eval/loss"]]
        row.best_eval_loss, row.final_eval_loss = min(losses), losses[-1]
    if scalars.get("eval/accuracy"):
        row.final_eval_accuracy = scalars["eval/accuracy"][-1][1]
    if scalars.get("train/tokens_per_sec"):
        row.median_tokens_per_sec = statistics.median(
            v for _, v in scalars["train/tokens_per_sec"])
    return row


def collect_runs(directory: Path | str) -> list[RunRow]:
    """One row per run dir under ``directory``: sweep points first, in sweep order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    run_dirs = find_run_dirs(directory)
    if not run_dirs:
        raise UserError(f"no run dirs (directories with a {rundir.CONFIG_FILE}) under "
                        f"{directory}")
    points = _sweep_overrides(directory)
    configs = {d: rundir.read_config(d) for d in run_dirs}
    varying = _varying_keys([c for c in configs.values() if c is not None])
    rows = []
    for d in run_dirs:
        if d.resolve() in points:
            overrides = points[d.resolve()][1]
        elif configs[d] is not None:
            overrides = " ".join(f"{k}={config_lib.get_key(configs[d], k)!r}"
                                 for k in varying)
        else:
            overrides = ""
        name = str(d.relative_to(directory)) if d != directory else d.name
        rows.append((points.get(d.resolve(), (len(points), ""))[0],
                     run_row(d, name, overrides)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


# --- formatting ------------------------------------------------------------------------------


def _cell(column: str, value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if column == "median_tokens_per_sec" else f"{value:.4f}"
    return str(value)


def _cells(rows: list[RunRow]) -> list[list[str]]:
    return [[_cell(c, getattr(r, c)) for c in COLUMNS] for r in rows]


CONSOLE_OVERRIDES_WIDTH = 60  # longer overrides are cut on the console (whole in CSV/markdown)


def _clip(text: str, width: int = CONSOLE_OVERRIDES_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_text(rows: list[RunRow]) -> str:
    """Aligned columns for the console (numbers right-aligned; long overrides cut)."""
    at = COLUMNS.index("overrides")
    cells = [[_clip(c) if i == at else c for i, c in enumerate(r)] for r in _cells(rows)]
    table = [list(COLUMNS), *cells]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    numeric = [c not in ("run", "overrides", "status") for c in COLUMNS]
    lines = []
    for r in table:
        lines.append("  ".join(cell.rjust(w) if num else cell.ljust(w)
                               for cell, w, num in zip(r, widths, numeric, strict=True))
                     .rstrip())
    return "\n".join(lines)


def format_markdown(rows: list[RunRow]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    numeric = [c not in ("run", "overrides", "status") for c in COLUMNS]
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in _cells(rows)]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[RunRow]) -> str:
    """Exact values (``repr`` of floats, empty where missing)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else
                         repr(v) if isinstance(v, float) else v
                         for v in (getattr(r, c) for c in COLUMNS)])
    return buf.getvalue()


def write_tables(directory: Path | str, rows: list[RunRow]) -> tuple[Path, Path]:
    directory = Path(directory)
    csv_path, md_path = directory / CSV_FILE, directory / MD_FILE
    csv_path.write_text(format_csv(rows))
    md_path.write_text(format_markdown(rows))
    return csv_path, md_path


TABLE_FORMATS = {".csv": format_csv, ".md": format_markdown}


def check_table_path(path: Path | str) -> Path:
    """``path`` if ``write_table`` can write it (a .csv or .md file in an existing directory);
    a UserError otherwise, before any run is read."""
    path = Path(path)
    if path.suffix not in TABLE_FORMATS:
        raise UserError(f"--out {path}: name a .csv or a .md file")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: directory {path.parent} does not exist")
    return path


def write_table(path: Path | str, rows: list[RunRow]) -> Path:
    """One table file, its format from the suffix: ``.csv`` (exact values) or ``.md``."""
    path = check_table_path(path)
    path.write_text(TABLE_FORMATS[path.suffix](rows))
    return path


def runs_table(directory: Path | str, write: bool = False) -> tuple[list[RunRow], str]:
    """Collects the rows -> (rows, the console text); ``write`` also writes runs.csv and
    runs.md into ``directory`` (and says so in the text)."""
    rows = collect_runs(directory)
    if not write:
        return rows, format_text(rows)
    csv_path, md_path = write_tables(directory, rows)
    return rows, f"{format_text(rows)}\n\nwrote {csv_path} and {md_path}"
