"""Step time and memory of the efficient attention families against sequence length.

Letters: B batch, T length (query = key), N heads, H head dim, D model width (AFT).

Families (papers in their modules under ``jaxformer/nn/``): dense ``reference`` and
``blocked`` (``attention_kernels``; blocked = the reference formula per query block of 512,
skipping the key blocks the causal mask hides, so causal only), ``longformer`` and
``bigbird`` (Beltagy et al. 2020; Zaheer et al. 2020: ``block_sparse``), ``performer``
(Choromanski et al. 2021, FAVOR+) and ``rfa`` (Peng et al. 2021: ``random_features``),
``linear`` (Katharopoulos et al. 2020: ``linear_attention``), ``lsh`` (Kitaev et al. 2020,
Reformer, shared query/key: ``lsh_attention``), ``aft_full``, ``aft_local``, ``aft_simple``
(Zhai et al. 2021: ``aft``).

What is measured, per (family, T): B = 1, N = K = 4 heads of H = 64 (AFT: its single-head
[B, T, D] form with D = 256), float32, causal unless ``--bidirectional``. The step is
forward + backward of the kernel alone (no projections):
``jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))``. It is compiled
once ahead of time; time = median over ``--reps`` calls (each ``block_until_ready``);
memory = the compiled executable's ``memory_analysis()``: temp + argument + output bytes
(XLA's static buffer plan, the peak the executable can need, not a measured RSS).
Family options: longformer/bigbird block 128, window 1 block, 1 global block, bigbird
2 random blocks; performer/rfa 128 features (their modules' default causal chunk, 64);
linear its default chunk (64); lsh 2 hashes, 2*T//128 buckets rounded to even, chunk 128
(lsh has one shared query/key: it reads q as qk and ignores k, whose gradient is zero);
aft_local window 128. AFT-full/local take a [T, T] position bias w as a fourth,
non-differentiated argument (the model's learned ``pos_bias``), so it counts in the
argument bytes.

Skips: a (family, T) whose compiled memory exceeds ``--max-gib`` is not run (memory is still
reported: compiling is cheap and allocates nothing); neither is one whose previous length
took more than ``--max-seconds`` per call (compiled for its memory only). Both print
"skipped" with the reason.

Output: a markdown table (family x T: ms per forward+backward, MiB), per family the
crossovers (smallest T faster than dense ``reference``, smallest T with less memory), the
load average before and after, and a figure (time and memory vs T, log-log) at ``--figure``.

Where it runs: whatever JAX's default backend is; on the development machine that is the
CPU (2 cores, shared with other work: times are noisy). Usage::

    JAX_PLATFORMS=cpu python scripts/bench_attention_families.py
    python scripts/bench_attention_families.py --lengths 1024 2048 --reps 3 --max-seconds 20
    python scripts/bench_attention_families.py --bidirectional --families reference linear
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxformer.nn.aft import aft_full, aft_local, aft_simple
from jaxformer.nn.attention_kernels import blocked_attention, reference_attention
from jaxformer.nn.block_sparse import bigbird_attention, longformer_attention
from jaxformer.nn.linear_attention import linear_attention
from jaxformer.nn.lsh_attention import lsh_attention
from jaxformer.nn.random_features import (
    draw_gaussian_features,
    draw_orthogonal_features,
    favor_attention,
    rfa_attention,
)

FAMILIES = ("reference", "blocked", "longformer", "bigbird", "performer", "rfa", "linear",
            "lsh", "aft_full", "aft_local", "aft_simple")
AFT_WITH_BIAS = ("aft_full", "aft_local")  # these take the [T, T] position bias w
HEADS, HEAD_DIM = 4, 64
AFT_WIDTH = HEADS * HEAD_DIM  # D = 256: the same width as the multi-head families
SPARSE_BLOCK, SPARSE_WINDOW, N_GLOBAL, N_RANDOM = 128, 1, 1, 2
FEATURES = 128
LSH_HASHES, LSH_CHUNK = 2, 128
AFT_WINDOW = 128
BLOCKED_BLOCK = 512
SEED = 0
MIB = 2**20


@dataclasses.dataclass
class Result:
    """One (family, T) cell: ms per step (None when not run), MiB (None when not compiled)."""

    ms: float | None = None
    mib: float | None = None
    skipped: str | None = None  # the reason, when not timed


def lsh_buckets(t: int) -> int:
    """2 * T / 128 buckets, rounded to even (at least 2): Reformer's ~chunk-sized buckets."""
    u = max(2, 2 * t // 128)
    return u + u % 2


def family_fn(name: str, t: int, is_causal: bool) -> Callable[..., jnp.ndarray]:
    """The kernel of family ``name`` at length T: (q, k, v[, w]) -> output.

    q, k, v [B, T, N, H] -> [B, T, N, H]; AFT: [B, T, D] (w [T, T] for full/local).
    """
    kw = dict(is_causal=is_causal)
    sparse = dict(block=SPARSE_BLOCK, window=SPARSE_WINDOW, n_global=N_GLOBAL, **kw)
    key = jax.random.key(SEED)
    if name == "reference":
        return lambda q, k, v: reference_attention(q, k, v, **kw)
    if name == "blocked":
        return lambda q, k, v: blocked_attention(q, k, v, block=BLOCKED_BLOCK, **kw)
    if name == "longformer":
        return lambda q, k, v: longformer_attention(q, k, v, **sparse)
    if name == "bigbird":
        return lambda q, k, v: bigbird_attention(q, k, v, n_random=N_RANDOM, seed=SEED, **sparse)
    if name == "performer":
        w = draw_orthogonal_features(key, FEATURES, HEAD_DIM)
        return lambda q, k, v: favor_attention(q, k, v, w, **kw)
    if name == "rfa":
        w = draw_gaussian_features(key, FEATURES, HEAD_DIM)
        return lambda q, k, v: rfa_attention(q, k, v, w, **kw)
    if name == "linear":
        return lambda q, k, v: linear_attention(q, k, v, **kw)
    if name == "lsh":  # shared QK: q is the shared projection, k is unused
        return lambda q, k, v: lsh_attention(q, v, n_hashes=LSH_HASHES, n_buckets=lsh_buckets(t),
                                             chunk=LSH_CHUNK, key=key, **kw)
    if name == "aft_full":
        return lambda q, k, v, w: aft_full(q, k, v, w, **kw)
    if name == "aft_local":
        return lambda q, k, v, w: aft_local(q, k, v, w, window=AFT_WINDOW, **kw)
    if name == "aft_simple":
        return lambda q, k, v: aft_simple(q, k, v, **kw)
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {name!r}")


def make_inputs(name: str, t: int) -> tuple[jnp.ndarray, ...]:
    """Random float32 inputs: q, k, v [1, T, N, H] (AFT: [1, T, D], plus w [T, T])."""
    shape = (1, t, AFT_WIDTH) if name.startswith("aft") else (1, t, HEADS, HEAD_DIM)
    keys = jax.random.split(jax.random.key(SEED + 1), 4)
    args = [jax.random.normal(kk, shape, jnp.float32) for kk in keys[:3]]
    if name in AFT_WITH_BIAS:
        args.append(0.1 * jax.random.normal(keys[3], (t, t), jnp.float32))
    return tuple(args)


def compile_step(name: str, t: int, is_causal: bool, args: tuple) -> jax.stages.Compiled:
    """Ahead-of-time compile of forward+backward: grads of sum(f) w.r.t. q, k, v."""
    step = jax.jit(jax.grad(lambda *a: family_fn(name, t, is_causal)(*a).sum(),
                            argnums=(0, 1, 2)))
    return step.lower(*args).compile()


def peak_mib(compiled: jax.stages.Compiled) -> float:
    """temp + argument + output bytes of the executable's buffer plan, in MiB."""
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / MIB


def median_ms(compiled: jax.stages.Compiled, args: tuple, reps: int) -> float:
    """Median wall time of ``reps`` calls, in ms."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_family(name: str, lengths: list[int], args: argparse.Namespace) -> dict[int, Result]:
    """Every length of one family, shortest first, applying the memory and time skips."""
    results: dict[int, Result] = {}
    previous: Result | None = None
    previous_t = 0
    for t in lengths:
        if name == "blocked" and args.bidirectional:
            results[t] = Result(skipped="causal only")
            continue
        inputs = make_inputs(name, t)
        compiled = compile_step(name, t, not args.bidirectional, inputs)
        res = Result(mib=peak_mib(compiled))
        if res.mib > args.max_gib * 1024:
            res.skipped = f"memory > {args.max_gib:g} GiB"
        elif previous is not None and previous.ms is None:
            # A longer run than one already skipped would only cost more.
            res.skipped = "shorter T skipped"
        elif previous is not None and previous.ms > 1e3 * args.max_seconds:
            res.skipped = f"T={previous_t} took > {args.max_seconds:g} s"
        else:
            res.ms = median_ms(compiled, inputs, args.reps)
        previous, previous_t = res, t
        results[t] = res
        print(f"  {name:>10} T={t:>6}: "
              + (f"{res.ms:10.1f} ms" if res.ms is not None else f"skipped ({res.skipped})")
              + (f", {res.mib:9.1f} MiB" if res.mib is not None else "")
              + f"  load {os.getloadavg()[0]:.2f}", flush=True)
        del compiled, inputs
    return results


def cell(r: Result) -> str:
    ms = f"{r.ms:.1f} ms" if r.ms is not None else f"skipped ({r.skipped})"
    mib = f"{r.mib:.1f} MiB" if r.mib is not None else "-"
    return f"{ms}, {mib}"


def table(results: dict[str, dict[int, Result]], lengths: list[int]) -> str:
    """Markdown table: one row per family, one column per T."""
    head = "| family | " + " | ".join(f"T={t}" for t in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    rows = [f"| {name} | " + " | ".join(cell(res[t]) for t in lengths) + " |"
            for name, res in results.items()]
    return "\n".join([head, rule, *rows])


def crossover(res: dict[int, Result], dense: dict[int, Result], lengths: list[int],
              field: str) -> str:
    """Smallest T at which ``field`` (ms or mib) is below dense's, both known; else why not."""
    both = [t for t in lengths
            if getattr(res[t], field) is not None and getattr(dense[t], field) is not None]
    for t in both:
        if getattr(res[t], field) < getattr(dense[t], field):
            return f"T={t}"
    alone = [t for t in lengths
             if getattr(res[t], field) is not None and getattr(dense[t], field) is None]
    if alone:  # dense was skipped where this family still ran
        return f"none up to T={both[-1] if both else '-'}; dense not run at T={alone[0]}"
    return f"none up to T={both[-1]}" if both else "not measured"


def crossovers(results: dict[str, dict[int, Result]], lengths: list[int]) -> str:
    dense = results.get("reference")
    if dense is None:
        return "(no crossovers: the dense 'reference' family was not measured)"
    lines = ["| family | faster than dense from | less memory than dense from |",
             "|---|---|---|"]
    for name, res in results.items():
        if name != "reference":
            lines.append(f"| {name} | {crossover(res, dense, lengths, 'ms')} | "
                         f"{crossover(res, dense, lengths, 'mib')} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, Result]], path: str, title: str) -> None:
    """Two log-log panels, time and memory vs T, one line per family."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (name, res) in enumerate(results.items()):
        style = dict(color=cmap(i % 20), marker="o", markersize=4,
                     linestyle="--" if name in ("reference", "blocked") else "-")
        timed = [(t, r.ms) for t, r in res.items() if r.ms is not None]
        sized = [(t, r.mib) for t, r in res.items() if r.mib is not None]
        if timed:
            ax_t.plot(*zip(*timed, strict=True), label=name, **style)
        if sized:
            ax_m.plot(*zip(*sized, strict=True), label=name, **style)
    for ax, ylabel in ((ax_t, "ms per forward+backward (median)"),
                       (ax_m, "MiB (temp + args + outputs, compiled)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--bidirectional", action="store_true", help="non-causal attention")
    p.add_argument("--max-gib", type=float, default=8.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--figure", default="docs/figures/attention_families_scaling.png")
    args = p.parse_args(argv)
    bad = [t for t in args.lengths if t < 256 or t % 256]
    if bad:  # block 128 with window and global blocks, lsh chunk 128, blocked block 512
        raise ValueError(f"--lengths must be multiples of 256 (>= 256); got {bad}")
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1; got {args.reps}")
    args.lengths = sorted(set(args.lengths))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "bidirectional" if args.bidirectional else "causal"
    machine = (f"{platform.node()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, backend {jax.default_backend()} "
               f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
    start_load = os.getloadavg()
    started = time.time()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {machine}")
    print(f"# {mode}, B=1, N={HEADS}, H={HEAD_DIM} (AFT D={AFT_WIDTH}), float32, "
          f"reps={args.reps}, max-gib={args.max_gib:g}, max-seconds={args.max_seconds:g}")
    print(f"# load average at start (1, 5, 15 min): {start_load}", flush=True)
    results = {name: measure_family(name, args.lengths, args) for name in args.families}
    end_load = os.getloadavg()
    print(f"\n## fwd+bwd time and compiled memory ({mode})\n")
    print(table(results, args.lengths))
    print("\n## crossovers vs dense reference\n")
    print(crossovers(results, args.lengths))
    print(f"\n# load average at end (1, 5, 15 min): {end_load}; "
          f"wall {time.time() - started:.0f} s")
    plot(results, args.figure, f"attention families, fwd+bwd, {mode}, B=1 N={HEADS} "
         f"H={HEAD_DIM} float32 -- {jax.default_backend()} ({os.cpu_count()} CPUs), "
         f"load {start_load[0]:.1f}-{end_load[0]:.1f}")
    print(f"# figure: {args.figure}")


if __name__ == "__main__":
    main()
