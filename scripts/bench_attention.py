"""Time every attention kernel available on this backend, forward and forward+backward.

Letters: B batch, T sequence length (query and key), N query heads, K key/value heads, H head dim.

FLOPs follow the FlashAttention-3 paper (Shah et al. 2024): forward
``4 * T**2 * H * N * B`` (the QK^T and PV matmuls), halved when causal; backward 2.5x the
forward, so forward+backward is 3.5x. TFLOP/s = those FLOPs / the median wall time over
``--runs`` timed calls after ``--warmup`` untimed ones (compilation included in the warmup).

Every kernel's output and gradients (dq, dk, dv for a random output cotangent) are checked
against the "reference" kernel run in float32 at highest matmul precision on the same inputs
(beyond 2**28 scores, on batch row 0 and the first key/value head group only, so the check
fits in memory); a relative error ``max|x - ref| / max(1, max|ref|)`` beyond the dtype's
tolerance fails the run (non-zero exit) after the table is printed, as does a kernel that
raises; running out of memory is reported and skipped. A kernel that fell back to "xla" for
these inputs is marked.

Usage::

    python scripts/bench_attention.py                                # CPU defaults
    python scripts/bench_attention.py --seq-lens 1024,4096 --head-dims 64,128 --dtype bfloat16
    python scripts/bench_attention.py --impls xla,cudnn --kv-heads 2 --causal true

Prints a markdown table, then one JSON line with every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.nn.attention_kernels import (
    BACKEND_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    reference_attention,
    resolve_implementation,
)

# Relative tolerance per compute dtype. float32 allows TF32 matmuls (GPU default precision).
TOLERANCE = {"float32": 5e-3, "bfloat16": 5e-2, "float16": 1e-2}
# Above this many [B, N, T, S] scores the reference check runs on a slice (see the docstring).
FULL_CHECK_MAX_SCORES = 2**28  # 1 GiB in float32

# On accelerators batch and heads default to the FlashAttention papers' sweep: 16k tokens per
# batch (B = 16384 / T) and model width 2048 (N = 2048 / H), so every row does the same work
# per token and the largest T still fits.
ACCELERATOR = dict(seq_lens="1024,2048,4096,8192,16384", head_dims="64,128", heads=None,
                   batch=None, dtype="bfloat16")
DEFAULTS = {
    "cpu": dict(seq_lens="128,256,512", head_dims="64", heads=4, batch=4, dtype="float32"),
    "gpu": ACCELERATOR,
    "tpu": ACCELERATOR,
}


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs (FlashAttention-3 convention); multiply by 3.5 for forward+backward."""
    return 4.0 * seq_len**2 * head_dim * heads * batch / (2.0 if causal else 1.0)


def median_seconds(fn, args: tuple, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(got, want) -> tuple[float, float]:
    """(max abs diff, max abs diff / max(1, max |want|)) over every leaf."""
    diff = scale = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        diff, scale = max(diff, float(np.abs(g - w).max())), max(scale, float(np.abs(w).max()))
    return diff, diff / max(1.0, scale)


def reference_check(out, grads, q, k, v, dout, causal: bool) -> tuple[float, float, float]:
    """(max abs diff of the output, of the gradients, worst relative error) against the
    float32 reference. Large problems are checked on batch row 0 and key/value head 0 with its
    query heads (heads and rows are independent), so the reference's [T, S] scores fit."""
    b, t, n, _ = q.shape
    kv = k.shape[2]
    if b * n * t * t > FULL_CHECK_MAX_SCORES:
        g = n // kv
        q, dout, out = q[:1, :, :g], dout[:1, :, :g], out[:1, :, :g]
        k, v = k[:1, :, :1], v[:1, :, :1]
        grads = (grads[0][:1, :, :g], grads[1][:1, :, :1], grads[2][:1, :, :1])
    with jax.default_matmul_precision("highest"):
        want_out, want_grads = jax.jit(fwd_bwd(reference_attention, causal))(
            *(x.astype(jnp.float32) for x in (q, k, v, dout)))
    diff_fwd, rel_fwd = relative_error(out, want_out)
    diff_grad, rel_grad = relative_error(grads, want_grads)
    return diff_fwd, diff_grad, max(rel_fwd, rel_grad)


def fwd_bwd(attend, causal: bool):
    """(q, k, v, dout) -> (output, (dq, dk, dv)): one forward and one backward pass."""
    def run(q, k, v, dout):
        out, vjp = jax.vjp(functools.partial(attend, is_causal=causal), q, k, v)
        return out, vjp(dout)
    return run


def bench_one(impl: str, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
              dtype: str, causal: bool, runs: int, warmup: int) -> dict:
    row = dict(impl=impl, batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads,
               head_dim=head_dim, dtype=dtype, causal=causal)
    keys = jax.random.split(jax.random.key(seq_len * 1000 + head_dim), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq_len, kv_heads, head_dim), dtype)
            for key in keys[1:3])
    dout = jax.random.normal(keys[3], q.shape, dtype)
    kernel = IMPLEMENTATIONS[impl]
    fwd = jax.jit(functools.partial(kernel, is_causal=causal))
    train = jax.jit(fwd_bwd(kernel, causal))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, grads = jax.block_until_ready(train(q, k, v, dout))
        diff_fwd, diff_grad, rel = reference_check(out, grads, q, k, v, dout, causal)
        del out, grads
        flops = attention_flops(batch, seq_len, heads, head_dim, causal)
        fwd_s = median_seconds(fwd, (q, k, v), runs, warmup)
        train_s = median_seconds(train, (q, k, v, dout), runs, warmup)
    except Exception as err:  # out of memory, or a shape the kernel rejects: report, go on
        return dict(row, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    fell_back = "; ".join(str(w.message) for w in caught if "using 'xla'" in str(w.message))
    return dict(row, fwd_ms=fwd_s * 1e3, fwd_tflops=flops / fwd_s / 1e12,
                fwd_bwd_ms=train_s * 1e3, fwd_bwd_tflops=3.5 * flops / train_s / 1e12,
                max_abs_diff_fwd=diff_fwd, max_abs_diff_grad=diff_grad,
                ok=rel <= TOLERANCE[dtype], fell_back=fell_back)


def is_out_of_memory(row: dict) -> bool:
    return "RESOURCE_EXHAUSTED" in row.get("error", "") or "out of memory" in row.get("error", "")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| impl | B | N | T | H | causal | fwd ms | fwd TFLOP/s | fwd+bwd ms "
             "| fwd+bwd TFLOP/s | max abs diff fwd / grad |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        head = (f"| {r['impl']} | {r['batch']} | {r['heads']} | {r['seq_len']} | {r['head_dim']} "
                f"| {r['causal']} ")
        if "error" in r:
            what = "out of memory" if is_out_of_memory(r) else f"ERROR {r['error']}"
            lines.append(head + f"| - | - | - | - | {what} |")
            continue
        note = (" FAIL" if not r["ok"] else "") + (" (fell back to xla)" if r["fell_back"] else "")
        lines.append(head +
                     f"| {r['fwd_ms']:.2f} | {r['fwd_tflops']:.3g} | {r['fwd_bwd_ms']:.2f} "
                     f"| {r['fwd_bwd_tflops']:.3g} "
                     f"| {r['max_abs_diff_fwd']:.1e} / {r['max_abs_diff_grad']:.1e}{note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    backend = jax.default_backend()
    defaults = DEFAULTS.get(backend, DEFAULTS["cpu"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=",".join(BACKEND_IMPLEMENTATIONS.get(backend, ())),
                   help="comma-separated kernel names (default: all on this backend)")
    p.add_argument("--seq-lens", default=defaults["seq_lens"])
    p.add_argument("--head-dims", default=defaults["head_dims"])
    p.add_argument("--heads", type=int, default=defaults["heads"],
                   help="query heads N (accelerator default: 2048 / H)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads K (default: N)")
    p.add_argument("--batch", type=int, default=defaults["batch"],
                   help="batch B (accelerator default: 16384 / T)")
    p.add_argument("--dtype", default=defaults["dtype"], choices=sorted(TOLERANCE))
    p.add_argument("--causal", default="both", choices=["true", "false", "both"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    try:
        impls = [resolve_implementation(name, backend) for name in args.impls.split(",")]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    causals = {"true": [True], "false": [False], "both": [False, True]}[args.causal]
    rows = []
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        for seq_len in (int(x) for x in args.seq_lens.split(",")):
            for causal in causals:
                batch = args.batch or max(1, 16384 // seq_len)
                heads = args.heads or max(1, 2048 // head_dim)
                for impl in impls:
                    rows.append(bench_one(impl, batch, seq_len, heads, args.kv_heads or heads,
                                          head_dim, args.dtype, causal, args.runs, args.warmup))

    device = jax.devices()[0]
    print(f"attention on {device.device_kind} ({backend}), {args.dtype}, "
          f"K={args.kv_heads or 'N'}, median of {args.runs} runs after {args.warmup} warmup")
    print(markdown_table(rows))
    print(json.dumps({"backend": backend, "device": device.device_kind, "rows": rows}))
    wrong = [r for r in rows if "error" not in r and not r["ok"]]
    crashed = [r for r in rows if "error" in r and not is_out_of_memory(r)]
    if wrong:
        print(f"error: {len(wrong)} result(s) differ from the reference beyond the "
              f"{args.dtype} tolerance {TOLERANCE[args.dtype]}", file=sys.stderr)
    if crashed:
        print(f"error: {len(crashed)} run(s) raised: {crashed[0]['error']}", file=sys.stderr)
    return 1 if wrong or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
