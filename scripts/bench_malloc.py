"""Train-step time under different glibc malloc settings, one step of each in turn.

    python scripts/bench_malloc.py "" "glibc.malloc.hugetlb=1" tuned

Each positional argument is a ``GLIBC_TUNABLES`` value for one worker process (``""``: glibc's
defaults; ``tuned``: the tunables the ``jaxformer`` command sets, jaxformer/malloc_tuning.py).
glibc reads them only at process start, so every variant is its own process: each compiles the
train step of ``--experiment`` with ``--set`` overrides (by default the GPT of
docs/benchmarks.md) on synthetic tokens, and then the workers take turns, one step each, for
``--rounds`` rounds, so all variants see the same machine conditions. Prints per variant the
median and minimum step time, the page faults per step and the peak resident memory, then a
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def worker(experiment: str, overrides: list[str]) -> None:
    """One variant's process: timed train steps on request
    (``jaxformer.train.bench.serve_steps``)."""
    from jaxformer.config import apply_overrides, load_experiment
    from jaxformer.train.bench import serve_steps

    serve_steps(apply_overrides(load_experiment(experiment), overrides))


def main(argv: list[str] | None = None) -> int:
    from jaxformer.malloc_tuning import TUNABLES
    from jaxformer.train.bench import BENCHMARK_GPT, read_reply, request_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='GLIBC_TUNABLES values; "" = glibc defaults, '
                                               '"tuned" = what the jaxformer command sets')
    p.add_argument("--experiment", default="experiments/gpt_tiny.py")
    p.add_argument("--set", dest="overrides", action="append", default=None,
                   help="KEY=VALUE (default: the benchmark GPT)")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    overrides = list(BENCHMARK_GPT) if args.overrides is None else args.overrides

    workers = {}
    for variant in args.variants:
        tunables = ":".join(TUNABLES) if variant == "tuned" else variant
        # JAXFORMER_MALLOC_TUNING=0: the worker must keep exactly the variant's tunables
        env = dict(os.environ, GLIBC_TUNABLES=tunables, JAXFORMER_MALLOC_TUNING="0")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", args.experiment, *overrides],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        read_reply(proc)  # the facts line, once compiled and warmed up
        workers[variant] = (proc, [])
        print(f"compiled: {variant!r}", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for proc, replies in workers.values():
            replies.append(request_step(proc))
            time.sleep(0.05)  # let the worker's threads go idle before the next one starts
    result = {}
    for variant, (proc, replies) in workers.items():
        proc.stdin.close()
        proc.wait()
        times = [r["s"] for r in replies]
        row = {"median_s": statistics.median(times), "min_s": min(times),
               "faults_per_step": statistics.median(r["faults"] for r in replies),
               "maxrss_mib": replies[-1]["maxrss_mib"]}
        result[variant] = row
        print(f"{variant or '(glibc defaults)':40s} median {row['median_s']:.3f} s  "
              f"min {row['min_s']:.3f} s  {row['faults_per_step']:>8.0f} faults/step  "
              f"peak RSS {row['maxrss_mib']:,.0f} MiB")
    print(json.dumps({"rounds": args.rounds, "overrides": overrides, "variants": result}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
