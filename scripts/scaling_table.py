"""The docs/scaling.md results table from `jaxformer compile` JSON lines.

    for t in v5p:4x4x8 v5e:16x16; do
      jaxformer compile experiments/scale/llama3_8b.py --topology $t | tail -1 >> reports.jsonl
    done
    python scripts/scaling_table.py reports.jsonl

Each input line is the JSON line `jaxformer compile` prints last (or a file of such lines; lines
that are not JSON are skipped). Prints one markdown row per report, with MaxText's published
*measured* MFU where the issue of comparable size names one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# MaxText README, measured MFU (their models and settings): (preset, chip, chips) -> percent
MAXTEXT = {("dense_32b", "v5p", 128): "71.5% (32B, v5p-128)",
           ("dense_32b", "v5e", 256): "66.9% (32B, v5e-256)",
           ("llama2_70b", "v5p", 512): "65.4% (Llama-2-70B, v5p-512)"}


def row(r: dict) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in r["mesh"].items() if s > 1)
    gib = f"{r['total_bytes'] / 2**30:.1f}" if r.get("total_bytes") else "?"
    mfu = (f"{r['mfu_percent']:.1f}% ({r['serial_mfu_percent']:.1f}%)"
           if "mfu_percent" in r else "-")
    maxtext = MAXTEXT.get((r["experiment"], r["chip"], r["chips"]), "")
    if not maxtext and r["experiment"] == "llama2_70b":
        maxtext = MAXTEXT[("llama2_70b", "v5p", 512)]
    return (f"| `{r['experiment']}` | {r['chip']}-{r['chips']} | {r['batch_size']} x "
            f"{r['seq_len']} | {mesh} | {r['remat']} | {gib} | "
            f"{'yes' if r['fits'] else 'no'} | {mfu} | {r.get('limited_by', '-')} | {maxtext} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    for path in args.files:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                print(row(json.loads(line)))


if __name__ == "__main__":
    main()
