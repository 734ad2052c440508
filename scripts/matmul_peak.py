"""Measure this machine's practical dense-matmul peak with PyTorch on CPU.

The number is used as the denominator of the model-FLOPs utilisation (MFU) that
``scripts/bench_vs_hf.py`` reports for the Hugging Face / PyTorch side. It is an
*achievable* peak (the best a large square ``torch.mm`` reaches on the threads we
are allowed to use), not the vendor's theoretical peak, so MFU against it reads as
"fraction of what a big GEMM gets on this box".

One ``torch.mm`` of two ``n x n`` matrices costs ``2 * n**3`` FLOPs (n**3 multiply-adds).

Usage::

    python scripts/matmul_peak.py [--n 2048] [--repeats 10] [--threads 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure_cpu_matmul_peak_torch(
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    warmup: int = 2,
    reduce: str = "best",
) -> float:
    """Return the FLOP/s of an ``n x n`` by ``n x n`` ``torch.mm`` on CPU.

    Uses whatever ``torch.get_num_threads()`` currently is; call
    ``torch.set_num_threads`` first to pin the thread count.

    Args:
        n: Matrix side. 2048 is large enough to be compute bound on a few cores.
        dtype: Element type (float32 by default, the dtype the benchmark trains in).
        repeats: Number of timed multiplications.
        warmup: Untimed multiplications first (page faults, thread-pool start-up).
        reduce: ``"best"`` (minimum time, i.e. the peak) or ``"median"``.

    Returns:
        FLOP/s, counting ``2 * n**3`` FLOPs per multiplication.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if reduce not in ("best", "median"):
        raise ValueError(f"reduce must be 'best' or 'median', got {reduce!r}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.no_grad():
        for _ in range(warmup):
            torch.mm(a, b, out=out)
        times: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    t = min(times) if reduce == "best" else statistics.median(times)
    return 2.0 * n**3 / t


def main() -> None:
    """CLI entry point: print the measured peak in GFLOP/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--reduce", default="best", choices=["best", "median"])
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    flops = measure_cpu_matmul_peak_torch(
        n=args.n, dtype=dtype, repeats=args.repeats, reduce=args.reduce
    )
    print(
        f"torch.mm {args.n}x{args.n} {args.dtype}, threads={torch.get_num_threads()}, "
        f"{args.reduce} of {args.repeats}: {flops / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
