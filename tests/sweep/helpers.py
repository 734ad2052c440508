"""A tiny experiment file with a sweep(), written into a test's temp dir."""

from __future__ import annotations

from pathlib import Path

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=300",
        "data.seq_len=32", "model.max_len=64", "train.batch_size=4", "train.steps=4",
        "train.warmup_steps=1", "eval.every=2", "eval.batches=1", "log.every=2",
        "checkpoint.every=2", "sample.count=0"]

TEMPLATE = '''"""A tiny experiment with a sweep (written by a test)."""
from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.sweep.space import grid, product, seeds  # noqa: F401


def config():
    return config_lib.apply_overrides(Config(name="tiny"), {overrides!r})


def sweep():
    return {sweep}
'''


def write_experiment(path: Path, sweep: str, corpus: Path | None = None,
                     define_sweep: bool = True) -> Path:
    """``path`` with config() (tiny, 4 steps) and ``def sweep(): return <sweep>``."""
    overrides = TINY + ([f"data.source={corpus}"] if corpus is not None else [])
    text = TEMPLATE.format(overrides=overrides, sweep=sweep)
    if not define_sweep:
        text = text.split("\n\ndef sweep():")[0] + "\n"
    path.write_text(text)
    return path
