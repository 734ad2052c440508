"""Train-step time under different glibc malloc settings, one step of each in turn.

    python scripts/bench_malloc.py "" runtime runtime-late tuned
    python scripts/bench_malloc.py "" "glibc.malloc.hugetlb=1" tuned

Each positional argument is a variant, one worker process each: a ``GLIBC_TUNABLES`` value
(``""``: glibc's defaults; ``tuned``: ``TUNABLES``, the heap-reuse settings as tunables, read
when the process starts), or ``runtime``: the same settings through ``mallopt`` at run time,
as ``JAXFORMER_MALLOC_TUNING=1 jaxformer train|bench`` applies them
(``jaxformer.malloc_tuning.tune_for_cpu_steps``, before JAX's backend starts), or
``runtime-late``: through ``mallopt`` after ``jax.devices()`` started the backend (too late:
its threads keep their arenas). Every variant is its own process: each compiles the
train step of ``--experiment`` with ``--set`` overrides (by default the GPT of
docs/benchmarks.md) on synthetic tokens, and then the workers take turns, one step each, for
``--rounds`` rounds, so all variants see the same machine conditions. Prints per variant the
median and minimum step time, the page faults per step and the peak resident memory, then a
JSON line. With ``--tokenize``, each round runs one fresh process per variant that trains the
default experiment's tokenizer and tokenizes the corpus (the variants' other cost).
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
# The settings of jaxformer.malloc_tuning as glibc tunables, read once at process start.
TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            f"glibc.malloc.trim_threshold={16 * 2**30}")
RUNTIME_VARIANTS = {"runtime": "early", "runtime-late": "late"}
RUNTIME_ENV = "BENCH_MALLOC_RUNTIME"  # tells a worker when to call mallopt


def worker(experiment: str, overrides: list[str]) -> None:
    """One variant's process: timed train steps on request (``bench_worker.serve_steps``)."""
    from bench_worker import serve_steps

    import jaxformer.objectives  # noqa: F401 - registers objective.kind, which validation needs
    from jaxformer.config import apply_overrides, load_experiment
    from jaxformer.malloc_tuning import reuse_heap, tune_for_cpu_steps

    cfg = apply_overrides(load_experiment(experiment), overrides)
    when = os.environ.get(RUNTIME_ENV, "")
    if when == "early":  # what JAXFORMER_MALLOC_TUNING=1 jaxformer train|bench does
        assert tune_for_cpu_steps({"JAXFORMER_MALLOC_TUNING": "1"}), "not applied"
    elif when == "late":  # the same settings once JAX's backend (and its threads) started
        import jax

        jax.devices()
        assert reuse_heap(), "not applied"
    serve_steps(cfg)


def variant_env(variant: str) -> dict[str, str]:
    """The environment of a variant's worker process."""
    when = RUNTIME_VARIANTS.get(variant, "")
    tunables = ":".join(TUNABLES) if variant == "tuned" else "" if when else variant
    return dict(os.environ, GLIBC_TUNABLES=tunables, **{RUNTIME_ENV: when})


def tokenize_worker() -> None:
    """One variant's process for ``--tokenize``: trains the default experiment's tokenizer
    (byte-level BPE, 4,096 tokens) on the standard library and tokenizes it, as a first
    ``jaxformer train experiments/gpt_tiny.py`` does; prints the seconds of each."""
    from jaxformer.data.stdlib_corpus import stdlib_files
    from jaxformer.data.tokenizer import encode_documents, train_tokenizer
    from jaxformer.malloc_tuning import tune_for_cpu_steps

    if os.environ.get(RUNTIME_ENV):  # the command tunes before it loads the data
        assert tune_for_cpu_steps({"JAXFORMER_MALLOC_TUNING": "1"}), "not applied"
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    start = time.perf_counter()
    tok = train_tokenizer(texts, 4096)
    trained = time.perf_counter()
    encode_documents(tok, texts)
    print(json.dumps({"train_s": trained - start, "encode_s": time.perf_counter() - trained}))


def compare_tokenizing(variants: list[str], rounds: int) -> int:
    """``--tokenize``: per round, one fresh process per variant in turn."""
    times: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--tokenize-worker"],
                                 cwd=REPO_ROOT, env=variant_env(variant), capture_output=True,
                                 text=True, check=True).stdout
            times[variant].append(json.loads(out.strip().splitlines()[-1]))
    result = {}
    for variant, runs in times.items():
        row = {key: statistics.median(r[key] for r in runs) for key in ("train_s", "encode_s")}
        result[variant] = row
        print(f"{variant or '(glibc defaults)':40s} train tokenizer {row['train_s']:.1f} s  "
              f"tokenize {row['encode_s']:.1f} s  (medians of {rounds})")
    print(json.dumps({"rounds": rounds, "tokenize": result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench_worker import BENCHMARK_GPT, read_reply, request_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='GLIBC_TUNABLES values; "" = glibc defaults, '
                                               '"tuned" = TUNABLES, "runtime", "runtime-late"')
    p.add_argument("--experiment", default="experiments/gpt_tiny.py")
    p.add_argument("--set", dest="overrides", action="append", default=None,
                   help="KEY=VALUE (default: the benchmark GPT)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--tokenize", action="store_true",
                   help="time training a tokenizer and tokenizing instead of train steps")
    args = p.parse_args(argv)
    overrides = list(BENCHMARK_GPT) if args.overrides is None else args.overrides
    if args.tokenize:
        return compare_tokenizing(args.variants, args.rounds)

    workers = {}
    for variant in args.variants:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", args.experiment, *overrides],
            cwd=REPO_ROOT, env=variant_env(variant), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
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
    if sys.argv[1:2] == ["--tokenize-worker"]:
        tokenize_worker()
        sys.exit(0)
    sys.exit(main())
