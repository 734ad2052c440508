"""Step time of every mesh preset on N fake CPU devices, relative to 1 device.

    python scripts/bench_presets.py                      # gpt_tiny shape, 8 fake devices
    python scripts/bench_presets.py --devices 8 --steps 5 --set train.batch_size=16

Each row runs ``jaxformer bench experiments/<experiment>.py`` in a fresh process (XLA fixes the
device count at start-up) with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and the
preset's overrides, and reads its JSON line. Fake devices share the same CPU cores, so on a
CPU this measures the cost of partitioning (collectives, re-layouts, smaller per-device
matmuls), not a speed-up: the ratio to 1 device is the overhead each preset adds. Prints a
markdown table, then one JSON line with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MOE = ["model.n_experts=8", "model.experts_top_k=2", "model.moe_d_ff=384"]
CASES: dict[str, list[str]] = {
    "data": ["mesh.preset=data"],
    "fsdp": ["mesh.preset=fsdp"],
    "fsdp_tensor (tensor=2)": ["mesh.preset=fsdp_tensor"],
    "sequence": ["mesh.preset=sequence"],
    "fsdp + scan + remat full": ["mesh.preset=fsdp", "model.scan_layers=true",
                                 "model.remat=full"],
    "expert (MoE 8 experts)": ["mesh.preset=expert", *MOE],
}


def bench(overrides: list[str], n_devices: int, steps: int, experiment: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
           "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "jaxformer.cli", "bench", experiment, "--steps", str(steps)]
    for o in overrides:
        args += ["--set", o]
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench failed for {overrides}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--experiment", default="experiments/gpt_tiny.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    print("| preset | step time, 1 device (s) | step time, "
          f"{args.devices} devices (s) | ratio | params + optimizer per device (MiB) |")
    print("|---|---|---|---|---|")
    for name, overrides in CASES.items():
        model = [o for o in overrides if not o.startswith("mesh.")]
        one = bench(args.overrides + model + ["mesh.data=1"], 1, args.steps, args.experiment)
        many = bench(args.overrides + overrides, args.devices, args.steps, args.experiment)
        state_mib = (many["memory"]["params_bytes"] + many["memory"]["opt_state_bytes"]) / 2**20
        ratio = many["step_time_s"] / one["step_time_s"]
        rows.append({"preset": name, "one": one, "many": many, "ratio": ratio})
        print(f"| {name} | {one['step_time_s']:.3f} | {many['step_time_s']:.3f} | "
              f"{ratio:.2f} | {state_mib:.1f} |", flush=True)
    print(json.dumps([{"preset": r["preset"], "ratio": r["ratio"],
                       "step_1": r["one"]["step_time_s"],
                       "step_n": r["many"]["step_time_s"]} for r in rows]))


if __name__ == "__main__":
    main()
