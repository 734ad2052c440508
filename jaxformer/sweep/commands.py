"""The ``jaxformer sweep`` and ``jaxformer runs`` subcommands."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from jaxformer.errors import UserError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``sweep`` and ``runs`` to the ``jaxformer`` command's subparsers."""
    p = subparsers.add_parser("sweep", help="run every point of an experiment's sweep()")
    p.add_argument("experiment", help="experiment file defining config() and sweep()")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value of every point (repeatable)")
    p.add_argument("--sweep-dir", type=Path, help="default: runs/<config name>_sweep")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="points trained at the same time (default 1), splitting the GPUs or "
                        "CPU threads")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the points and their run dirs; run nothing")
    mode.add_argument("--emit", choices=("slurm", "tpu"),
                      help="write a SLURM job array or a TPU VM script instead of running")

    p = subparsers.add_parser("runs", help="a table of the runs under a directory")
    p.add_argument("directory", type=Path, metavar="DIR")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, metavar="FILE",
                     help="also write the table to FILE: .csv (exact values) or .md (markdown)")
    out.add_argument("--write", action="store_true",
                     help="also write DIR/runs.csv and DIR/runs.md")


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxformer.runs.lock import live_holder
    from jaxformer.sweep import runner
    from jaxformer.sweep.space import load_sweep
    from jaxformer.sweep.table import runs_table

    if args.parallel < 1:
        raise UserError("--parallel must be at least 1")
    sweep = load_sweep(args.experiment, args.overrides)
    sweep_dir = args.sweep_dir or runner.default_sweep_dir(sweep)
    n = len(sweep.points)
    if args.dry_run:
        print(f"{n} point(s) of {args.experiment} in {sweep_dir} (dry run, nothing started), "
              "each with its run dir and every --set it trains with:")
        for point in sweep.points:
            done = runner.checkpoint_step(sweep_dir / point.name)
            state = ("finished" if done >= point.cfg.train.steps else
                     "running" if live_holder(sweep_dir / point.name) is not None else
                     f"at step {done}/{point.cfg.train.steps}" if done else "not started")
            # Every --set the point's `jaxformer train` gets: the command line's, then its own.
            sets = [*sweep.base_overrides, *point.args]
            print(f"  [{point.index + 1}/{n}] {sweep_dir / point.name}  "
                  f"{shlex.join(sets) or '(no overrides)'}  ({state})")
        return 0
    if args.emit:
        from jaxformer.sweep.emit import emit
        from jaxformer.sweep.hparams import write_sweep_hparams

        runner.write_sweep_file(sweep, sweep_dir)
        write_sweep_hparams(sweep, sweep_dir)
        path = emit(sweep, sweep_dir, args.emit)
        how = f"sbatch {path}" if args.emit == "slurm" else f"TPU_NAME=... bash {path}"
        print(f"wrote {path} ({n} point(s)); run it with: {how}")
        return 0
    results = runner.run_sweep(sweep, sweep_dir, args.parallel)
    try:
        print(runs_table(sweep_dir, write=True)[1])  # the sweep dir is the sweep's own output
    except UserError as e:  # e.g. every point failed before writing its run dir
        print(f"no runs table: {e}")
    bad = [name for name, result in results.items() if result == "failed"]
    counts = {r: list(results.values()).count(r) for r in ("finished", "skipped", "failed")}
    print(f"sweep: {counts['finished']} finished, {counts['skipped']} skipped, "
          f"{counts['failed']} failed of {n}; tensorboard --logdir {sweep_dir}")
    if bad:
        print(f"failed: {', '.join(bad)}; fix and run the same command again to retry them")
        return 1
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from jaxformer.sweep.table import check_table_path, runs_table, write_table

    if args.out is not None:
        check_table_path(args.out)
    rows, text = runs_table(args.directory, write=args.write)
    print(text)
    if args.out is not None:
        print(f"\nwrote {write_table(args.out, rows)}")
    return 0


COMMANDS = {"sweep": cmd_sweep, "runs": cmd_runs}
