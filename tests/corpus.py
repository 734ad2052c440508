"""A small synthetic corpus of Python-like documents, written by tests into a temp dir.

It is regular enough that a tiny model learns it in a few hundred steps, and varied enough
(names, numbers, operators drawn from a seeded generator) that memorizing is not enough.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "index", "item", "data"]
OPS = ["+", "-", "*"]
# data.source prefixes of generated or bundled data (pairs, LRA tasks, images, speech,
# captions): an experiment reading one needs no corpus.
GENERATED_SOURCES = ("synthetic:", "lra:", "image:", "speech:", "caption:")


def document(rng: np.random.Generator, i: int) -> str:
    lines = [f'"""Module {i}."""', ""]
    for f in range(int(rng.integers(2, 5))):
        a, b = rng.choice(NAMES, 2, replace=False)
        op = rng.choice(OPS)
        n = int(rng.integers(0, 10))
        lines += [f"def {a}_{f}({a}, {b}):",
                  f"    {b} = {b} {op} {n}",
                  f"    return {a} {op} {b}",
                  ""]
    return "\n".join(lines)


def write_corpus(directory: Path, n_docs: int = 80, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        (directory / f"mod_{i:03d}.py").write_text(document(rng, i))
    return directory
