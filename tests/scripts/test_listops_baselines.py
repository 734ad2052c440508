"""scripts/listops_baselines.py: the top-level reading of an expression, the per-operator
majority written out here, and the command's table and bad input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxformer.data import lra

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/listops_baselines.py"

spec = importlib.util.spec_from_file_location("listops_baselines", SCRIPT)
baselines = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baselines)


def test_top_level_reads_only_the_outer_operators_arguments():
    ids = lra.listops_ids("[MAX 2 9 [MIN 4 7 [SM 1 1 ] ] 0 [MED 3 3 ] 9 ]")
    op, digits, children, n_args = baselines.top_level(ids)
    assert lra.OPERATORS[op] == "[MAX"
    assert digits.tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 2]  # 2, 9, 0, 9; not 4 7 1 1 3 3
    assert children.tolist() == [1, 0, 1, 0]  # [MIN and [MED; [SM is one level deeper
    assert n_args == 6


def test_operator_majority_is_each_operators_most_frequent_training_value():
    rng = np.random.default_rng(0)
    train = [lra.random_listops(rng, 8, 40) for _ in range(300)]
    train_y = np.asarray([lra.evaluate_listops(t) for t in train])
    test = [lra.random_listops(rng, 8, 40) for _ in range(50)]
    # written out: count (first token, value) pairs by hand
    counts: dict[int, list[int]] = {}
    for t, y in zip(train, train_y, strict=True):
        counts.setdefault(int(t[0]), [0] * 10)[y] += 1
    expected = [max(range(10), key=lambda v, c=counts[int(t[0])]: (c[v], -v)) for t in test]
    assert baselines.operator_majority(train, train_y, test).tolist() == expected
    # MAX's most frequent value is 9 and MIN's 0: the prior a model learns from the first token
    assert np.argmax(counts[lra.OP_BASE + lra.OPERATORS.index("[MAX")]) == 9
    assert np.argmax(counts[lra.OP_BASE + lra.OPERATORS.index("[MIN")]) == 0


def test_the_command_prints_one_row_per_feature_set_and_refuses_bad_sizes(capsys):
    assert baselines.main(["--seq-len", "48", "--train", "300", "--heldout", "64",
                           "--rounds", "20"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [r.split(" | ")[0][2:] for r in rows]
    assert names == ["majority class", "top-level operator", *baselines.FITTED]
    accuracies = [float(r.rstrip(" |").split(" | ")[-1]) for r in rows]
    assert all(0 < a <= 100 for a in accuracies)
    assert accuracies[1] > accuracies[0]  # the operator alone beats the majority class
    bad = subprocess.run([sys.executable, str(SCRIPT), "--train", "0"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stdout == ""
