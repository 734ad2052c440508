"""How far shallow features of a ListOps expression go: the held-out accuracy of classifiers
that see no bracket structure below the top level.

    python scripts/listops_baselines.py --seq-len 256

The expressions are the ones `data.source=lra:listops` trains and evaluates on
(`jaxformer.data.lra`): ``--train`` training draws and the first ``--heldout`` held-out
expressions (1,024 is what `eval.batches=64` of 16 rows reads). Each row of the table is one
set of features:

- the majority class of the held-out rows;
- the top-level operator alone (the first token): the majority value of each operator on the
  training draws, counted directly;
- the operator and how often each token id occurs anywhere (a bag of tokens), and the length;
- the operator and the digits that are its own arguments (depth 1);
- those, the operators of its sub-expressions and its argument count.

The last three are fitted by scikit-learn's ``HistGradientBoostingClassifier``. A model whose
accuracy equals the operator row has learned the first token and nothing of the nesting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from jaxformer.data import lra

Features = Callable[[np.ndarray], np.ndarray]


def top_level(ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, int]:
    """One expression's ids [n] -> (operator index 0..3, digit counts [10] of its own digit
    arguments, operator counts [4] of its sub-expressions, its argument count)."""
    digits, children, n_args, depth = np.zeros(10), np.zeros(4), 0, 0
    for t in ids[1:-1]:
        if depth == 0:
            n_args += 1
            if lra.DIGIT_BASE <= t < lra.OP_BASE:
                digits[t - lra.DIGIT_BASE] += 1
            elif lra.OP_BASE <= t < lra.END_ID:
                children[t - lra.OP_BASE] += 1
        if lra.OP_BASE <= t < lra.END_ID:
            depth += 1
        elif t == lra.END_ID:
            depth -= 1
    return operator(ids), digits, children, n_args


def operator(ids: np.ndarray) -> int:
    """The top-level operator's index 0..3: an expression's first token."""
    return int(ids[0]) - lra.OP_BASE


def _bag(ids: np.ndarray) -> np.ndarray:
    op = operator(ids)
    counts = np.bincount(ids, minlength=lra.LISTOPS_VOCAB)[lra.DIGIT_BASE:]
    return np.concatenate([np.eye(4)[op], counts, [len(ids)]])


def _own_digits(ids: np.ndarray) -> np.ndarray:
    op, digits, _, _ = top_level(ids)
    return np.concatenate([np.eye(4)[op], digits])


def _shallow(ids: np.ndarray) -> np.ndarray:
    op, digits, children, n_args = top_level(ids)
    return np.concatenate([np.eye(4)[op], digits, children, [n_args]])


FITTED: dict[str, Features] = {
    "operator + bag of tokens + length": _bag,
    "operator + its own digit arguments": _own_digits,
    "operator + own digits + sub-expression operators + argument count": _shallow,
}


def operator_majority(train: list[np.ndarray], train_y: np.ndarray,
                      test: list[np.ndarray]) -> np.ndarray:
    """Predictions [n_test]: each expression's operator's most frequent training value."""
    ops = np.asarray([operator(t) for t in train])
    best = {op: int(np.bincount(train_y[ops == op], minlength=10).argmax())
            for op in np.unique(ops)}
    fallback = int(np.bincount(train_y, minlength=10).argmax())
    return np.asarray([best.get(operator(t), fallback) for t in test])


def baselines(seq_len: int, n_train: int, n_heldout: int, rounds: int = 200, seed: int = 0,
              echo: Callable[[str], None] = print) -> dict[str, float]:
    """-> {features: held-out accuracy} for ListOps rows of ``seq_len`` (CLS included)."""
    source = lra.create("lra:listops", seq_len, lra.LISTOPS_VOCAB, 10)
    train, labels = [], []
    for i in range(n_train):
        tokens, label = source.draw(np.random.default_rng([seed, i]), False)
        train.append(tokens)
        labels.append(label)
        if (i + 1) % 2000 == 0:
            echo(f"  drew {i + 1:,} / {n_train:,} training expressions")
    train_y = np.asarray(labels)
    heldout = source.heldout_examples(n_heldout)
    test = [t for t, _ in heldout]
    test_y = np.asarray([y for _, y in heldout])
    out = {"majority class": float(np.bincount(test_y, minlength=10).max() / len(test_y)),
           "top-level operator": float(np.mean(operator_majority(train, train_y, test)
                                               == test_y))}
    for name, features in FITTED.items():
        model = HistGradientBoostingClassifier(max_iter=rounds, random_state=seed)
        model.fit(np.stack([features(t) for t in train]), train_y)
        out[name] = float(np.mean(model.predict(np.stack([features(t) for t in test]))
                                  == test_y))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256,
                        help="data.seq_len of the rows (CLS + up to seq_len-1 tokens)")
    parser.add_argument("--train", type=int, default=10_000, help="training draws")
    parser.add_argument("--heldout", type=int, default=1024, help="held-out expressions")
    parser.add_argument("--rounds", type=int, default=200, help="boosting rounds of each fit")
    args = parser.parse_args(argv)
    if args.seq_len < 5 or min(args.train, args.heldout, args.rounds) < 1:
        print("error: --seq-len must be >= 5, --train, --heldout and --rounds >= 1",
              file=sys.stderr)
        return 2
    result = baselines(args.seq_len, args.train, args.heldout, args.rounds,
                       echo=lambda s: print(s, file=sys.stderr))
    print(f"| features (seq_len {args.seq_len}, {args.train:,} training draws, "
          f"{args.heldout:,} held out) | accuracy % |\n|---|---:|")
    for name, acc in result.items():
        print(f"| {name} | {100 * acc:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
