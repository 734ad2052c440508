"""Side-by-side training-step benchmark: jaxformer (JAX) vs Hugging Face GPT-2 (PyTorch, CPU).

Both sides train a GPT-2-style decoder of the same shape (layers, width, heads,
vocabulary, sequence length, batch size) in float32 and are run one after the
other in one invocation -- never concurrently, they would fight over the cores.

PyTorch side
    ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` with random
    weights (nothing is downloaded), dropout off (jaxformer has none by default),
    train mode, eager PyTorch (no ``torch.compile``; ``torch.backends.mkldnn``
    left at its defaults), the attention implementation transformers picks by
    default (recorded in the output), ``torch.optim.AdamW(lr=3e-4,
    weight_decay=0.1)``. One step = forward with ``labels=input_ids`` (random
    tokens, fixed seed), backward, ``clip_grad_norm_(1.0)``, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``. ``--warmup`` untimed steps, then ``--steps``
    steps each timed with ``time.perf_counter``; we report the median.

JAX side
    ``python -m jaxformer.cli bench EXPERIMENT --steps N --warmup W --set ...`` in a
    subprocess; the last stdout line is a JSON object with ``params``,
    ``tokens_per_sec``, ``step_time_s`` (median), ``compile_s``,
    ``flops_per_token``, ``mfu_percent``, ``device``, ``peak_flops`` (compilation is
    outside the timed steps and reported as ``compile_s``). XLA's CPU backend
    uses every core it sees; on the 2-core benchmark machine that equals
    ``--threads 2``. A warning is printed when the two differ.

Timing order
    By default all PyTorch steps are timed first, then the ``jaxformer bench`` subprocess.
    With ``--interleave`` both sides are alive at once and take turns, one step each (the
    jaxformer side in a worker subprocess running ``bench_worker.serve_steps`` on
    the same experiment and overrides), so a machine whose speed drifts slows both alike.
    Both sides reuse the heap across steps (``JAXFORMER_MALLOC_TUNING=1``,
    jaxformer/malloc_tuning.py) unless ``--default-malloc``.

FLOP accounting (same formula as jaxformer)::

    flops_per_token = 6 * N_matmul + 6 * L * T * d

``N_matmul`` is the number of parameters that take part in matrix multiplies.
Each such weight costs 2 FLOPs (multiply + add) per token in the forward pass
and 4 in the backward pass (gradient w.r.t. the input and w.r.t. the weight),
hence 6 per token for a training step. What we count, exactly (identical to
``jaxformer.train.flops.matmul_params``: ``L * (4 d^2 + 2 d F) + V d``, F = 4d):

* the 2-D weight matrices under ``transformer.h.*`` -- per block
  ``attn.c_attn`` (d x 3d), ``attn.c_proj`` (d x d), ``mlp.c_fc`` (d x 4d),
  ``mlp.c_proj`` (4d x d), i.e. 12 d^2 per block;
* plus ``V * d`` for the output projection onto the vocabulary, which is tied
  to the token embedding (so the embedding parameters are counted once, here);
* NOT the biases and layer-norm gains/biases (``ln_1``, ``ln_2``, ``ln_f``;
  13 d per block, elementwise, no matmul), NOT the token-embedding lookup or
  the position embedding ``wpe`` (gathers and adds). The count including the
  block biases and norms is reported too, as ``n_block_all`` (all of
  ``transformer.h.*``); it changes FLOPs/token by ~0.25% at the default shape.

The ``6 * L * T * d`` term is causal self-attention's two activation-by-
activation matmuls, which have no parameters. Per token and per layer, summed
over heads (``n_heads * d_head = d``):

* scores ``Q K^T``: the token's query (d) dotted with T keys -> 2 * T * d FLOPs,
* mixing ``A V``: T attention weights times T values of width d -> 2 * T * d.

Forward: 4 * T * d per layer per token, 4 * L * T * d in all. Training (forward
+ backward, backward = 2x forward) = 3x forward = 12 * L * T * d. With a causal
mask a token only attends to the positions up to itself, on average T/2 of
them, so halving gives ``6 * L * T * d``. (Softmax, layer norms, GELU, the
loss and the optimizer update are not counted, as is customary.)

MFU = flops_per_token * tokens_per_sec / peak_flops. For the PyTorch side the
peak is this machine's fp32 ``torch.mm`` peak (``scripts/matmul_peak.py``,
2048x2048, best of repeats, same thread count), measured once per run; the JAX
side reports the peak jaxformer measured itself, printed alongside.

Example::

    python scripts/bench_vs_hf.py                      # both sides, default shapes
    python scripts/bench_vs_hf.py --interleave         # one step of each side in turn
    python scripts/bench_vs_hf.py --skip-jax --json-out /tmp/hf.json

Output: a markdown table, then one JSON line with every number (last line of stdout).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_peak import measure_cpu_matmul_peak_torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def flops_per_token(n_matmul: int, n_layers: int, seq_len: int, d_model: int) -> int:
    """Training FLOPs per token: ``6 * N_matmul + 6 * L * T * d`` (see module docstring)."""
    return 6 * n_matmul + 6 * n_layers * seq_len * d_model


def count_hf_params(model: torch.nn.Module, vocab_size: int, d_model: int) -> dict[str, int]:
    """Count parameters of a ``GPT2LMHeadModel``.

    Returns:
        ``params``: all unique parameters (tied embedding counted once);
        ``n_block_all``: everything under ``transformer.h.*`` (weights, biases, norms);
        ``n_block_matrices``: the 2-D weight matrices under ``transformer.h.*``;
        ``n_matmul``: ``n_block_matrices + V*d`` (used for FLOPs, as jaxformer does);
        ``n_matmul_incl_bias_norm``: ``n_block_all + V*d``.
    """
    params = sum(p.numel() for p in model.parameters())
    n_block = 0
    n_block_matrices = 0
    for name, p in model.named_parameters():
        if name.startswith("transformer.h."):
            n_block += p.numel()
            if p.ndim == 2:
                n_block_matrices += p.numel()
    vd = vocab_size * d_model
    return {
        "params": params,
        "n_block_all": n_block,
        "n_block_matrices": n_block_matrices,
        "n_matmul": n_block_matrices + vd,
        "n_matmul_incl_bias_norm": n_block + vd,
    }


def build_torch_step(args: argparse.Namespace) -> tuple[Callable[[], float], dict[str, Any]]:
    """HF GPT-2 with random weights and its eager training step -> (step, facts about it);
    ``step()`` trains on one fixed batch and returns the loss."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.seq_len,
        n_embd=args.d_model,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's defaults (50256) lie outside a small vocabulary; unused in training.
        bos_token_id=args.vocab_size - 1,
        eos_token_id=args.vocab_size - 1,
    )
    model = GPT2LMHeadModel(config).to(torch.float32)
    model.train()
    attn_impl = getattr(model.config, "_attn_implementation", None)
    counts = count_hf_params(model, args.vocab_size, args.d_model)
    fpt = flops_per_token(counts["n_matmul"], args.n_layers, args.seq_len, args.d_model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(
        0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen, dtype=torch.long
    )

    def step() -> float:
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    facts = {
        "impl": "hf-transformers GPT2LMHeadModel (torch eager)",
        "params": counts["params"],
        "n_matmul": counts["n_matmul"],
        "n_block_all": counts["n_block_all"],
        "n_block_matrices": counts["n_block_matrices"],
        "n_matmul_incl_bias_norm": counts["n_matmul_incl_bias_norm"],
        "flops_per_token": fpt,
        "attn_implementation": attn_impl,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device": "cpu",
    }
    return step, facts


def bench_torch(args: argparse.Namespace, peak_flops: float) -> dict[str, Any]:
    """Build HF GPT-2 with random weights and time eager training steps on CPU."""
    step, facts = build_torch_step(args)
    t0 = time.perf_counter()
    first_loss = step()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    times: list[float] = []
    loss = first_loss
    load_before = os.getloadavg()[0]
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    # CPU seconds this process used per wall second while timing: ~= threads when it had
    # the cores to itself, noticeably less when something else was competing for them.
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)

    median = statistics.median(times)
    tokens_per_step = args.batch_size * args.seq_len
    tps = tokens_per_step / median
    result = {
        **facts,
        "step_time_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "step_times_s": times,
        "first_step_s": first_step_s,
        "cpu_utilization": cpu_util,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
        "tokens_per_sec": tps,
        "peak_flops": peak_flops,
        "mfu_percent": 100 * facts["flops_per_token"] * tps / peak_flops,
        "first_loss": first_loss,
        "last_loss": loss,
    }
    return result


def jax_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides that give jaxformer's experiment the benchmark's shapes."""
    return [f"model.n_layers={args.n_layers}", f"model.d_model={args.d_model}",
            f"model.n_heads={args.n_heads}", f"model.vocab_size={args.vocab_size}",
            f"model.max_len={args.seq_len}", f"data.seq_len={args.seq_len}",
            f"train.batch_size={args.batch_size}"]


def experiment_path(args: argparse.Namespace) -> Path:
    experiment = Path(args.experiment)
    return experiment.resolve() if not experiment.is_absolute() and experiment.exists() \
        else experiment


def bench_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``jaxformer bench`` in a subprocess and parse the JSON on its last stdout line."""
    experiment = experiment_path(args)
    cmd = [
        sys.executable,
        "-m",
        "jaxformer.cli",
        "bench",
        str(experiment),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    for override in jax_overrides(args):
        cmd += ["--set", override]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.jax_timeout
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"jaxformer bench exited with {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError("jaxformer bench printed nothing on stdout")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"last stdout line of jaxformer bench is not JSON: {lines[-1]!r}") from e
    missing = ({"params", "tokens_per_sec", "step_time_s", "mfu_percent", "peak_flops"}
               - result.keys())
    if missing:
        raise RuntimeError(f"jaxformer bench JSON lacks keys {sorted(missing)}: {result}")
    result["impl"] = "jaxformer (JAX/XLA)"
    result["subprocess_wall_s"] = wall
    result["command"] = cmd
    return result


# Seconds of idle time between the two sides' steps in --interleave, so that one side's
# spinning worker threads (OpenMP's, XLA's) have gone to sleep before the other side starts.
INTERLEAVE_PAUSE_S = 0.05


def jax_worker(experiment: str, warmup: int, overrides: list[str]) -> None:
    """The jaxformer half of ``--interleave``, run in a subprocess: timed train steps on
    request (``bench_worker.serve_steps``, scripts/bench_worker.py)."""
    from bench_worker import serve_steps

    import jaxformer.objectives  # noqa: F401 - registers objective.kind, which validation needs
    from jaxformer.config import apply_overrides, load_experiment

    serve_steps(apply_overrides(load_experiment(experiment), overrides), warmup)


def bench_interleaved(args: argparse.Namespace, peak_flops: float
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides alive at once, one step of each in turn (never concurrently): a PyTorch
    step here, then a jaxformer step in the ``jax_worker`` subprocess, ``--steps`` times, so
    that both are timed under the same machine conditions. -> (hf row, jaxformer row)."""
    from bench_worker import read_reply, request_step

    step, facts = build_torch_step(args)
    for _ in range(args.warmup):
        step()
    cmd = [sys.executable, os.path.abspath(__file__), "--jax-worker", str(experiment_path(args)),
           str(args.warmup), *jax_overrides(args)]
    worker = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    jax_facts = read_reply(worker)
    times: dict[str, list[float]] = {"hf": [], "jax": []}
    losses = {}
    for _ in range(args.steps):
        start = time.perf_counter()
        losses["hf"] = step()
        times["hf"].append(time.perf_counter() - start)
        time.sleep(INTERLEAVE_PAUSE_S)
        answer = request_step(worker)
        times["jax"].append(answer["s"])
        losses["jax"] = answer["loss"]
        time.sleep(INTERLEAVE_PAUSE_S)
    worker.stdin.close()
    worker.wait()
    tokens_per_step = args.batch_size * args.seq_len
    rows = {}
    for side, side_facts, impl in (("hf", facts, facts["impl"]),
                                   ("jax", jax_facts, "jaxformer (JAX/XLA)")):
        median = statistics.median(times[side])
        tps = tokens_per_step / median
        rows[side] = {**side_facts, "impl": impl, "step_time_s": median,
                      "step_time_min_s": min(times[side]), "step_times_s": times[side],
                      "tokens_per_sec": tps, "peak_flops": peak_flops,
                      "mfu_percent": 100 * side_facts["flops_per_token"] * tps / peak_flops,
                      "last_loss": losses[side]}
    rows["jax"]["command"] = cmd
    return rows["hf"], rows["jax"]


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}M"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render the comparison rows as a markdown table."""
    out = [
        "| implementation | params | median step (s) | tokens/s | MFU | peak (GFLOP/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['impl']} | {_fmt_params(r.get('params'))} | {r['step_time_s']:.4f} "
            f"| {r['tokens_per_sec']:,.0f} | {r['mfu_percent']:.1f}% "
            f"| {r['peak_flops'] / 1e9:.1f} |"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(
        description="Benchmark jaxformer's train step against HF transformers GPT-2 (CPU)."
    )
    p.add_argument("--experiment", default="experiments/gpt_tiny.py")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (both sides)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip-jax", action="store_true", help="only run the PyTorch side")
    p.add_argument("--interleave", action="store_true",
                   help="alternate single steps of the two sides instead of timing one "
                        "side after the other (robust to a machine whose speed drifts)")
    p.add_argument("--jax-timeout", type=float, default=3600.0, help="seconds")
    p.add_argument("--peak-repeats", type=int, default=10, help="torch.mm repeats for the peak")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--default-malloc", action="store_true",
                   help="both sides with glibc's default malloc settings (no heap reuse, "
                        "see jaxformer/malloc_tuning.py)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.interleave and args.skip_jax:
        p.error("--interleave needs both sides; drop --skip-jax")
    if args.d_model % args.n_heads:
        p.error("--d-model must be divisible by --n-heads")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ncpu = os.cpu_count()
    if not args.skip_jax and ncpu != args.threads:
        print(
            f"warning: --threads {args.threads} but XLA's CPU backend will use all {ncpu} "
            "cores; the comparison is not at equal thread count",
            file=sys.stderr,
        )

    peak = measure_cpu_matmul_peak_torch(n=2048, dtype=torch.float32, repeats=args.peak_repeats)
    print(
        f"fp32 torch.mm 2048^3 peak ({args.threads} threads): {peak / 1e9:.1f} GFLOP/s",
        file=sys.stderr,
        flush=True,
    )

    if args.interleave:
        return report(args, peak, *bench_interleaved(args, peak), None)
    # Sequential on purpose: torch first, fully finished, then the JAX subprocess.
    hf = bench_torch(args, peak)
    hf["contended"] = hf["cpu_utilization"] < 0.85 * args.threads
    if hf["contended"]:
        print(
            f"warning: the torch steps got {hf['cpu_utilization']:.2f} CPU-seconds per second "
            f"with {args.threads} threads: another process was competing for the cores; "
            "these numbers are not trustworthy, rerun on a quiet machine",
            file=sys.stderr,
        )
    gc.collect()  # the torch model and optimizer state are out of scope now; free them
    jax_res: dict[str, Any] | None = None
    jax_error: str | None = None
    if not args.skip_jax:
        try:
            jax_res = bench_jax(args)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            jax_error = str(e)
            print(f"jaxformer side failed: {jax_error}", file=sys.stderr)
    return report(args, peak, hf, jax_res, jax_error)


def report(args: argparse.Namespace, peak: float, hf: dict[str, Any],
           jax_res: dict[str, Any] | None, jax_error: str | None) -> int:
    """Print the table, the ratio and the JSON line; return the exit status."""
    rows = [hf] if jax_res is None else [hf, jax_res]
    mode = ("interleaved, one step of each in turn" if args.interleave
            else "one side after the other")
    print(
        f"\nshapes: L={args.n_layers} d={args.d_model} H={args.n_heads} T={args.seq_len} "
        f"B={args.batch_size} V={args.vocab_size}, fp32, {args.threads} threads, "
        f"{args.steps} timed steps ({mode}); HF attention: {hf['attn_implementation']}\n"
    )
    print(markdown_table(rows))
    ratio = None
    if jax_res is not None:
        ratio = jax_res["tokens_per_sec"] / hf["tokens_per_sec"]
        print(f"\njaxformer / HF tokens/s: {ratio:.2f}x")
        if jax_res.get("flops_per_token") not in (None, hf["flops_per_token"]):
            print(
                f"note: flops_per_token differs: jaxformer {jax_res['flops_per_token']} "
                f"vs HF {hf['flops_per_token']} (parameter layouts differ)"
            )
        print(
            f"peaks: torch fp32 mm {peak / 1e9:.1f} GFLOP/s, "
            f"jaxformer-reported {jax_res['peak_flops'] / 1e9:.1f} GFLOP/s"
        )

    summary = {
        "shapes": {
            "n_layers": args.n_layers,
            "d_model": args.d_model,
            "n_heads": args.n_heads,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "vocab_size": args.vocab_size,
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "interleave": args.interleave,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch_matmul_peak_flops": peak,
        "hf": hf,
        "jaxformer": jax_res,
        "jaxformer_error": jax_error,
        "skip_jax": args.skip_jax,
        "malloc_tuning": os.environ.get("JAXFORMER_MALLOC_TUNING"),
        "ratio_tokens_per_sec_jax_over_hf": ratio,
    }
    line = json.dumps(summary, sort_keys=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    print(line, flush=True)
    return 1 if jax_error is not None else 0


if __name__ == "__main__":
    # Both sides reuse the heap across steps (jaxformer/malloc_tuning.py) unless
    # --default-malloc, so the comparison measures the frameworks, not the allocator: this
    # process (the PyTorch side, or the --interleave worker, which inherits the variable)
    # calls mallopt before torch or JAX start their threads, and the ``jaxformer bench``
    # subprocess does the same when it sees JAXFORMER_MALLOC_TUNING=1.
    if "--default-malloc" in sys.argv:
        os.environ["JAXFORMER_MALLOC_TUNING"] = "0"
    os.environ.setdefault("JAXFORMER_MALLOC_TUNING", "1")
    from jaxformer.malloc_tuning import tune_for_cpu_steps

    tune_for_cpu_steps()
    if sys.argv[1:2] == ["--jax-worker"]:  # the subprocess of --interleave
        jax_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        sys.exit(0)
    sys.exit(main())
