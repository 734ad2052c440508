"""The results table of the Long Range Arena-style sweep (experiments/lra_sweep.py): per
attention type and task, held-out accuracy (with the majority class of the same held-out set),
train steps per second and the compiled train step's temporaries, beside the accuracy the LRA
paper published for the nearest model.

    jaxformer sweep experiments/lra_sweep.py            # trains runs/lra_sweep/*
    python scripts/lra_results.py runs/lra_sweep        # markdown to stdout

Numbers come from each run dir: the final eval accuracy (event files, as ``jaxformer runs``),
the median tokens/s over the logged steps divided by the tokens of a step (batch x
data.seq_len), the majority-class baseline and "step temporaries" (XLA's memory analysis of
the compiled train step, per device) from the sweep's train.log. A point not finished shows
its status instead.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from jaxformer.runs import rundir
from jaxformer.sweep.table import find_run_dirs, run_row

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")

# Tay et al. 2021, "Long Range Arena", Table 1 (accuracy %, 1k-4k tokens): the published
# model nearest to each attention type here (None: not in LRA's table).
LRA_PAPER: dict[str, tuple[str, tuple[float, ...]] | None] = {
    "mha": ("Transformer", (36.37, 64.27, 57.46, 42.44, 71.40)),
    "longformer": ("Longformer", (35.63, 62.85, 56.89, 42.22, 69.71)),
    "bigbird": ("BigBird", (36.05, 64.02, 59.29, 40.83, 74.87)),
    "performer": ("Performer", (18.01, 65.40, 53.82, 42.77, 77.05)),
    "rfa": None,
    "linear": ("Linear Trans.", (16.13, 65.90, 53.09, 42.34, 75.30)),
    "lsh": ("Reformer", (37.27, 56.10, 53.40, 38.07, 68.50)),
    "aft_full": None,
    "aft_local": None,
    "aft_simple": None,
}


def _from_log(run_dir: Path) -> tuple[float, float]:
    """(majority-class baseline, step temporaries MiB) from the point's train.log (nan when
    absent)."""
    log = run_dir / "train.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    base = re.findall(r"majority class baseline ([0-9.]+)", text)
    temp = re.findall(r"step temporaries ([0-9.]+) MiB", text)
    return (float(base[-1]) if base else math.nan, float(temp[-1]) if temp else math.nan)


def collect(sweep_dir: Path) -> dict[tuple[str, str], str]:
    """{(attention type, task): "acc (majority) · steps/s · MiB"} of every run under the dir."""
    cells = {}
    for run_dir in find_run_dirs(sweep_dir):
        cfg = rundir.read_config(run_dir)
        if cfg is None or not cfg.data.source.startswith("lra:"):
            continue
        task = cfg.data.source.removeprefix("lra:")
        row = run_row(run_dir, run_dir.name, "")
        if row.status != "finished":
            cells[(cfg.model.attention_type, task)] = row.status
            continue
        baseline, temp = _from_log(run_dir)
        steps_per_s = row.median_tokens_per_sec / (cfg.train.batch_size * cfg.data.seq_len)
        cells[(cfg.model.attention_type, task)] = (
            f"{100 * row.final_eval_accuracy:.1f} ({100 * baseline:.0f}) · "
            f"{steps_per_s:.2f}/s · {temp:.1f} MiB")
    return cells


def markdown(cells: dict[tuple[str, str], str]) -> str:
    types = list(LRA_PAPER) + sorted({a for a, _ in cells} - set(LRA_PAPER))
    head = ["attention_type", *TASKS, "LRA paper (model: ListOps / Text / Retrieval / Image / "
            "Pathfinder)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in types:
        paper = LRA_PAPER.get(a)
        ref = "—" if paper is None else f"{paper[0]}: " + " / ".join(f"{v:.1f}" for v in paper[1])
        lines.append("| " + " | ".join([f"`{a}`", *(cells.get((a, t), "—") for t in TASKS), ref])
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?", default=Path("runs/lra_sweep"))
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory (run the sweep first)",
              file=sys.stderr)
        return 2
    print(markdown(collect(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
