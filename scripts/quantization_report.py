"""Validation perplexity and weight bytes of runs in float, INT8 and INT4 (a markdown table).

For each run dir: quantizes its newest checkpoint with ``jaxformer quantize``'s code into
``--out/<run name>-int8`` and ``-int4`` (its float weights, weights only, into ``-float``),
loads each copy back as ``sample`` does (int weights, dequantized inside the jit) and scores
it on the run's own validation rows as training's evaluation does (``eval.batches`` batches of
``train.batch_size``; ``--batches`` overrides).

    python scripts/quantization_report.py runs/gpt_tiny runs/llama_tiny --out /tmp/quantized
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxformer.inference.quantize import (
    DEFAULT_GROUP_SIZE,
    load_quantized,
    param_bytes,
    quantize_run,
    validation_loss,
)
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run


def _disk_bytes(run_dir: Path) -> int:
    """Bytes of the newest checkpoint's files (orbax metadata included)."""
    ckpts = run_dir / rundir.CHECKPOINT_DIR
    newest = max((p for p in ckpts.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    state = newest / "state"
    return sum(p.stat().st_size for p in state.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="where the quantized copies go")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    p.add_argument("--batches", type=int, default=None)
    args = p.parse_args()

    rows = []
    for run_dir in args.run_dirs:
        cfg, params = load_run(run_dir)
        tok = run_dir / rundir.TOKENIZER_FILE
        t = time.perf_counter()
        ref = validation_loss(cfg, params, tok, batches=args.batches)
        print(f"{run_dir.name} float32: loss {ref['loss']:.4f} over {ref['tokens']:.0f} tokens "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
        # The run's own checkpoint holds the optimizer moments too: the float row's disk
        # bytes are those of a weights-only copy, as the quantized copies are.
        floats = args.out / f"{run_dir.name}-float"
        ckpt = Checkpointer(floats / rundir.CHECKPOINT_DIR, keep=1)
        ckpt.save_params(0, params, {"config": rundir.config_lib.to_dict(cfg)})
        ckpt.close()
        rows.append((run_dir.name, "float32", param_bytes(params), _disk_bytes(floats), ref,
                     ref))
        for bits in (8, 4):
            out = args.out / f"{run_dir.name}-int{bits}"
            quantize_run(run_dir, out, bits, args.group_size)
            cfg_q, qparams, unpack = load_quantized(out)
            t = time.perf_counter()
            got = validation_loss(cfg_q, qparams, tok, unpack=unpack, batches=args.batches)
            print(f"{run_dir.name} int{bits}: loss {got['loss']:.4f} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
            scheme = "INT8 per channel" if bits == 8 else f"INT4 groups of {args.group_size}"
            rows.append((run_dir.name, scheme, param_bytes(qparams), _disk_bytes(out), got, ref))

    print("\n| run | weights | bytes in memory | checkpoint on disk | val loss | perplexity "
          "| change |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, scheme, mem, disk, ev, ref in rows:
        change = ("" if ev is ref else
                  f"{100 * (ev['perplexity'] / ref['perplexity'] - 1):+.2f}%")
        print(f"| {name} | {scheme} | {mem / 2**20:.2f} MiB | {disk / 2**20:.2f} MiB | "
              f"{ev['loss']:.4f} | {ev['perplexity']:.2f} | {change} |")


if __name__ == "__main__":
    main()
