"""Every experiment file loads, validates, and runs one train step and its checkpoint (on a
small corpus, so the test does not depend on the size of the machine's standard library)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jaxformer import config as config_lib
from jaxformer.train.loop import train
from tests.corpus import GENERATED_SOURCES, write_corpus

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_runs_one_step(path, tmp_path):
    cfg = config_lib.load_experiment(path)
    corpus = write_corpus(tmp_path / "corpus", n_docs=200)
    # Two steps planned, stopped after the first: the end-of-run evaluation (its own compile,
    # and decoding for some objectives, each tested with its recipe) is not what this checks.
    overrides = ["train.steps=2", "train.warmup_steps=0", "train.batch_size=2", "eval.batches=1",
                 "data.val_fraction=0.1", "sample.count=0", "train.init_from=",
                 "train.teacher="]
    if not cfg.data.source.startswith(GENERATED_SOURCES):  # generated or bundled: no corpus
        overrides.append(f"data.source={corpus}")
    cfg = config_lib.apply_overrides(cfg, overrides)
    result = train(cfg, tmp_path / "run", progress=False, echo=lambda s: None, stop_at=1)
    assert result.final_step == 1
    # one step from random weights: about the loss of a uniform guess, ln(vocab) or less (a
    # classifier's: ln(classes))
    loss = result.losses[1]
    classes = cfg.model.num_labels or cfg.model.vocab_size
    assert math.isfinite(loss) and 0 < loss < 1.5 * math.log(classes), loss
