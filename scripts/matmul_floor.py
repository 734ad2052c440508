"""The matmul floor of a GPT training step: its weight products alone, in XLA and in PyTorch.

    python scripts/matmul_floor.py                 # the benchmark GPT of docs/benchmarks.md
    python scripts/matmul_floor.py --layers 4 --d-model 256 --vocab 8192 --tokens 2048

A training step of a GPT-2-style decoder multiplies, per layer, x [M, D] by the q/k/v
projection [D, 3D], the attention output projection [D, D], the MLP's [D, F] and [F, D], and
the final activations by the tied vocabulary table [V, D]; the backward pass multiplies each
output gradient by the weight (input gradient) and by the layer's input (weight gradient).
That is 3 products per weight and ``6 · N_matmul · M`` FLOPs in all (M = batch · seq tokens;
attention's score and value products, the softmax, norms, loss and optimizer are left out).

This script runs exactly those products, in the layouts a step uses (``x @ W``,
``g @ Wᵀ``, ``xᵀ @ g``; the head as ``x @ Eᵀ``, ``g @ E``, ``gᵀ @ x``), once as one jitted
JAX function (XLA's CPU matmuls) and once as eager ``torch`` calls on the same number of
threads, alternating the two for ``--rounds`` rounds so both see the same machine. The
median time of each is a lower bound for a step of that framework on this machine: no step
can be faster than its matmuls. Dividing PyTorch's whole step by XLA's floor bounds what
jaxformer / Hugging Face tokens/s can reach with XLA's matmuls.

With ``--per-product``, each distinct product is also timed alone, XLA and PyTorch in turn,
to show which ones fall behind.

Output: one line per framework (median seconds, GFLOP/s), the per-product table if asked
for, and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def products(layers: int, d: int, f: int, vocab: int, m: int) -> list[tuple[str, tuple, tuple]]:
    """(layout, shape of a, shape of b) of every weight product of one training step."""
    out = []
    for _ in range(layers):
        for k, n in ((d, 3 * d), (d, d), (d, f), (f, d)):
            out += [("x@W", (m, k), (k, n)), ("g@W.T", (m, n), (k, n)), ("x.T@g", (m, k), (m, n))]
    out += [("x@W.T", (m, d), (vocab, d)), ("g@W", (m, vocab), (vocab, d)),
            ("g.T@x", (m, vocab), (m, d))]
    return out


def flops(prods: list[tuple[str, tuple, tuple]]) -> int:
    total = 0
    for layout, a, b in prods:
        m, k = (a[1], a[0]) if layout.endswith(".T@g") or layout == "g.T@x" else a
        n = b[0] if layout.endswith("W.T") else b[1]
        total += 2 * m * k * n
    return total


def apply(layout: str, a, b):
    """``a`` times ``b`` in the given layout (works for jax.numpy and torch arrays)."""
    if layout in ("x@W", "g@W"):
        return a @ b
    if layout in ("g@W.T", "x@W.T"):
        return a @ b.T
    return a.T @ b  # "x.T@g", "g.T@x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=None, help="MLP width (default 4 · d-model)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=2048, help="batch · seq tokens per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-product", action="store_true",
                   help="also time each distinct product alone in both frameworks")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    prods = products(args.layers, args.d_model, args.ffn or 4 * args.d_model, args.vocab,
                     args.tokens)
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal(a, dtype=np.float32), rng.standard_normal(b, dtype=np.float32))
            for _, a, b in prods]
    layouts = [layout for layout, _, _ in prods]
    on_device = [(jax.device_put(a), jax.device_put(b)) for a, b in host]
    on_torch = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in host]

    @jax.jit
    def xla_products(pairs):
        return [apply(layout, a, b) for layout, (a, b) in zip(layouts, pairs, strict=True)]

    def run_xla() -> float:
        start = time.perf_counter()
        jax.block_until_ready(xla_products(on_device))
        return time.perf_counter() - start

    def run_torch() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            outs = [apply(layout, a, b) for layout, (a, b) in zip(layouts, on_torch, strict=True)]
        elapsed = time.perf_counter() - start
        del outs
        return elapsed

    for _ in range(2):
        run_xla()
        run_torch()
    times = {"xla": [], "torch": []}
    for _ in range(args.rounds):
        times["xla"].append(run_xla())
        time.sleep(0.05)  # let torch's OpenMP threads stop spinning before XLA's turn
        times["torch"].append(run_torch())
        time.sleep(0.05)
    total = flops(prods)
    result = {"products": len(prods), "flops": total, "threads": args.threads,
              "rounds": args.rounds}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": med, "min_s": min(ts), "gflops": total / med / 1e9}
        print(f"{name:6s} {len(prods)} products, {total / 1e9:.1f} GFLOP: median {med:.3f} s, "
              f"min {min(ts):.3f} s, {total / med / 1e9:.0f} GFLOP/s")
    if args.per_product:
        result["per_product"] = per_product(prods, args.rounds)
    print(json.dumps(result))
    return 0


def per_product(prods: list[tuple[str, tuple, tuple]], rounds: int) -> list[dict]:
    """Median milliseconds of each distinct product alone, XLA and PyTorch alternating."""
    import jax
    import numpy as np
    import torch

    rows = []
    print(f"{'product':32s} {'XLA ms':>8s} {'torch ms':>9s} {'XLA/torch':>10s}")
    for layout, sa, sb in dict.fromkeys(prods):
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal(sa, dtype=np.float32), rng.standard_normal(sb, dtype=np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        xla = jax.jit(lambda x, y, layout=layout: apply(layout, x, y))
        jax.block_until_ready(xla(ja, jb))
        times: dict[str, list[float]] = {"xla": [], "torch": []}
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(xla(ja, jb))
            times["xla"].append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                apply(layout, ta, tb)
                times["torch"].append(time.perf_counter() - start)
        x_ms, t_ms = (1e3 * statistics.median(times[k]) for k in ("xla", "torch"))
        name = f"{layout} {sa}x{sb}"
        rows.append({"product": name, "xla_ms": x_ms, "torch_ms": t_ms})
        print(f"{name:32s} {x_ms:8.2f} {t_ms:9.2f} {x_ms / t_ms:10.2f}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
