"""Where the train step's time goes: a jax.profiler trace, summed per XLA op.

    taskset -c 0 python scripts/profile_step.py                      # one core: no overlap
    python scripts/profile_step.py --set model.attention=reference --top 40

Compiles the train step of ``--experiment`` (by default the GPT of docs/benchmarks.md) on
synthetic tokens, times ``--steps`` steps, then traces as many more and prints, per XLA op,
its own time per step (time inside the op minus the ops nested in it), its output shape and
the JAX operation it came from (HLO metadata), and the totals of matmul ops (YNNPACK fusions
and dots) and of everything else. Pinned to one core the per-op times add up to the step; on
more cores ops overlap and each op's time is its wall time on the thread that ran it.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import tempfile
from pathlib import Path

RUNTIME_EVENTS = ("ThunkExecutor", "Threadpool", "SlinkyThreadPool")


def _add_own_times(events: list[tuple[int, int, str]], own: collections.Counter) -> None:
    """Adds each event's duration minus its nested events' to ``own[name]``; events are
    (start_ns, duration_ns, name) of one thread."""
    stack: list[list] = []  # [end, name, duration, children]

    def pop() -> None:
        _, name, duration, children = stack.pop()
        own[name] += duration - children
        if stack:
            stack[-1][3] += duration

    for start, duration, name in sorted(events, key=lambda x: (x[0], -x[1])):
        while stack and stack[-1][0] <= start:
            pop()
        stack.append([start + duration, name, duration, 0])
    while stack:
        pop()


def own_times(trace_file: Path) -> collections.Counter:
    """ns of own time per event name on XLA's CPU worker threads (children subtracted)."""
    from jax.profiler import ProfileData

    own: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(str(trace_file)).planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                _add_own_times([(e.start_ns, e.duration_ns, e.name) for e in line.events], own)
    return own


def op_metadata(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, JAX op_name)."""
    pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = (\(?\S+) .*?metadata=\{op_name="([^"]*)"'
    return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(pattern, hlo, re.M)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/gpt_tiny.py")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="on top of the benchmark GPT's shapes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)

    import jax
    from bench_worker import BENCHMARK_GPT

    from jaxformer.config import apply_overrides, load_experiment
    from jaxformer.train.bench import compiled_step, timed_step

    cfg = apply_overrides(load_experiment(args.experiment), [*BENCHMARK_GPT, *args.overrides])
    _, step, state, batch, _ = compiled_step(cfg)

    def run() -> float:
        nonlocal state
        state, _, elapsed = timed_step(step, state, batch)
        return elapsed

    for _ in range(2):
        run()
    times = [run() for _ in range(args.steps)]
    print(f"step: median {statistics.median(times):.3f} s, min {min(times):.3f} s "
          f"(without the profiler)")
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                run()
        own = own_times(next(Path(trace_dir).rglob("*.xplane.pb")))
    meta = op_metadata(step.as_text())
    ops = {name: ns / args.steps / 1e6 for name, ns in own.items()
           if not name.startswith(RUNTIME_EVENTS)}
    print(f"\n{'ms/step':>8}  {'op':28s} {'output':28s} from")
    for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, op_name = meta.get(name, ("?", "?"))
        print(f"{ms:8.1f}  {name:28s} {shape[:28]:28s} {op_name[-60:]}")
    matmul = sum(ms for name, ms in ops.items() if name.startswith(("ynn_fusion", "dot")))
    print(f"\nmatmul ops {matmul:.0f} ms/step, other ops {sum(ops.values()) - matmul:.0f} "
          "ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
