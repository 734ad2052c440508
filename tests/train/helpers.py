"""Builds a tiny model's train state and step for tests: on random text batches (no data
pipeline involved), or on the batches of the config's objective (``task_batches``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.objectives.tasks import build_task
from jaxformer.train.runtime import build_runtime

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64",
        "model.max_len=16", "data.seq_len=16", "train.batch_size=8", "train.steps=20",
        "train.warmup_steps=2", "train.lr=1e-2"]


def run_config(source: str, *extra: str) -> Config:
    """A tiny 8-step run on the text files in ``source`` (``extra`` overrides win)."""
    return config_lib.apply_overrides(Config(), [
        f"data.source={source}", "data.seq_len=32", "model.max_len=32", "model.n_layers=2",
        "model.d_model=32", "model.n_heads=2", "model.vocab_size=300", "train.batch_size=4",
        "train.steps=8", "train.warmup_steps=2", "checkpoint.every=4", "log.every=1",
        "eval.every=4", "eval.batches=2", "sample.count=0", *extra])


def tiny_config(*overrides: str) -> Config:
    return config_lib.apply_overrides(Config(), TINY + list(overrides))


def random_batch(cfg: Config, seed: int, pad_tail: int = 3) -> dict[str, np.ndarray]:
    """Random tokens, two packed documents per row, the last ``pad_tail`` positions padding."""
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    half = t // 2
    seg = np.where(np.arange(t) < half, 1, 2).astype(np.int32)
    pos = np.where(np.arange(t) < half, np.arange(t), np.arange(t) - half).astype(np.int32)
    weights = np.ones((b, t), np.float32)
    weights[:, half - 1] = 0  # the target of a document's last token is the next document's
    seg = np.broadcast_to(seg, (b, t)).copy()
    if pad_tail:
        seg[:, -pad_tail:] = 0
        weights[:, -pad_tail:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
            "positions": np.broadcast_to(pos, (b, t)).copy(), "loss_weights": weights}


def task_batches(cfg: Config, tokenizer_path: Path | None = None
                 ) -> Callable[[int], dict[str, np.ndarray]]:
    """step -> the whole global batch the trainer reads at ``step`` (``task.train_batch``):
    pixels and labels, audio and transcripts, ... as ``objective.kind`` builds them. A text
    task loads or trains its tokenizer at ``tokenizer_path`` (None: in a temporary directory,
    removed at once; generated sources such as image: and speech: need no tokenizer)."""
    if tokenizer_path is not None:
        task = build_task(cfg, tokenizer_path, log=lambda line: None)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            task = build_task(cfg, Path(tmp) / "tokenizer.json", log=lambda line: None)
    return lambda step: task.train_batch(step, cfg.train.batch_size, cfg.train.seed, 0, 1)


def make_runner(cfg: Config, devices=None):
    """-> (state, step_fn, batch_sharding) on a mesh over ``devices`` (default: one)."""
    rt = build_runtime(cfg, devices if devices is not None else jax.devices()[:1])
    return rt.init_state(), rt.train_step, rt.batch_sharding


def run_steps(cfg: Config, n: int, devices=None, fixed_batch: bool = False
              ) -> tuple[list[float], object]:
    """n train steps on random batches (or, with fixed_batch, on batch 0 every step)."""
    state, step, b_sharding = make_runner(cfg, devices)
    losses = []
    for s in range(n):
        batch = random_batch(cfg, 0 if fixed_batch else s)
        state, metrics = step(state, jax.device_put(batch, b_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state
