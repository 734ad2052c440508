"""scripts/scaling_table.py turns `jaxformer compile` JSON lines into the docs table rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rows_from_report_lines(tmp_path):
    report = {"experiment": "dense_32b", "chip": "v5p", "chips": 128, "batch_size": 512,
              "seq_len": 4096, "mesh": {"data": 1, "fsdp": 128, "tensor": 1}, "remat": "full",
              "total_bytes": 42.13 * 2**30, "fits": True, "mfu_percent": 81.87,
              "serial_mfu_percent": 76.5, "limited_by": "compute"}
    path = tmp_path / "reports.jsonl"
    path.write_text("compiling...\n" + json.dumps(report) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/scaling_table.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("| `dense_32b` | v5p-128 | 512 x 4096 | fsdp=128 | full | 42.1 | yes | "
                           "81.9% (76.5%) | compute | 71.5% (32B, v5p-128) |")
