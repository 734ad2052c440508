"""scripts/bench_decode.py --verify-cost runs as documented: one row per token count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prints_a_row_per_token_count():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_decode.py"), "--verify-cost", "--layers", "1",
         "--width", "32", "--heads", "2", "--vocab", "64", "--context", "16", "--calls", "4",
         "--reps", "1", "--tokens", "1", "3"],
        capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["1", "3"]  # header, then T = 1 and T = 3
    one, three = rows[1], rows[2]
    assert one[2].strip() == "1.00" and one[3].strip() == "1.00x"
    ratio = float(three[2])
    bound = float(three[3].strip().rstrip("x"))
    # both printed to 2 decimals: the ratio's rounding (0.005) moves 3 / ratio by 0.015 / ratio^2
    assert ratio > 0 and abs(bound - 3 / ratio) <= 0.015 / ratio**2 + 0.01
    assert "0.0M parameters" in out  # 1 layer of width 32: about 13k parameters
