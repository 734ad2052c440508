"""Time the train steps of several variants of one experiment, round-robin in one process.

    python scripts/bench_step_variants.py "model.attention=reference" "model.attention=blocked"

Each positional argument is one variant: space-separated KEY=VALUE overrides on top of
``--base`` (by default the GPT of docs/benchmarks.md: 4 layers, d_model 256, 4 heads, vocab
8192, seq 256, batch 8). Every variant is compiled first; then each round times one step of
each variant in turn, so all variants see the same machine conditions. On a shared machine
whose speed drifts by 20% from minute to minute, separate ``jaxformer bench`` runs cannot
resolve a 10% difference; interleaved steps can. Prints one line per variant (median and
minimum over the rounds) and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='overrides of one variant, e.g. "model.remat=full"')
    p.add_argument("--experiment", default="experiments/gpt_tiny.py")
    p.add_argument("--base", default=None,
                   help="overrides shared by every variant (default: the benchmark GPT)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)


    from bench_worker import BENCHMARK_GPT

    from jaxformer.config import apply_overrides, load_experiment
    from jaxformer.train.bench import compiled_step, timed_step

    base = " ".join(BENCHMARK_GPT) if args.base is None else args.base
    runs = {}
    for variant in args.variants:
        cfg = apply_overrides(load_experiment(args.experiment), base.split() + variant.split())
        _, step, state, batch, _ = compiled_step(cfg)
        for _ in range(args.warmup):
            state, _, _ = timed_step(step, state, batch)
        runs[variant] = {"step": step, "state": state, "batch": batch, "times": []}
        print(f"compiled: {variant}", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for run in runs.values():
            run["state"], _, elapsed = timed_step(run["step"], run["state"], run["batch"])
            run["times"].append(elapsed)
    result = {}
    for variant, run in runs.items():
        med, best = statistics.median(run["times"]), min(run["times"])
        result[variant] = {"median_s": med, "min_s": best}
        print(f"{variant:45s} median {med:.3f} s  min {best:.3f} s")
    print(json.dumps({"rounds": args.rounds, "base": base,
                      "malloc_tuning": os.environ.get("JAXFORMER_MALLOC_TUNING"),
                      "variants": result}))
    return 0


if __name__ == "__main__":
    # Heap reuse across steps (jaxformer/malloc_tuning.py), as the benchmarks in
    # docs/benchmarks.md were run, before JAX starts its threads; JAXFORMER_MALLOC_TUNING=0
    # times the steps with glibc's defaults instead.
    from jaxformer.malloc_tuning import tune_for_cpu_steps

    os.environ.setdefault("JAXFORMER_MALLOC_TUNING", "1")
    tune_for_cpu_steps()
    sys.exit(main())
