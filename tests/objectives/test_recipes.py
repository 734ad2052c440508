"""Short versions of the recipes: each objective trains a tiny model through the real loop
and must beat its baseline by a margin (the full recipes and their numbers: docs/objectives.md).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.cli import main
from jaxformer.config import Config, ModelConfig
from jaxformer.models import presets
from jaxformer.train.loop import train
from tests.corpus import write_corpus

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SMALL = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=400, max_len=64)


def run(tmp_path, model: ModelConfig, *overrides: str, corpus: bool = True):
    cfg = dataclasses.replace(Config(), model=model)
    base = ["train.batch_size=16", "train.warmup_steps=10", "log.every=10",
            "data.val_fraction=0.1", "sample.count=0", "eval.batches=4"]
    if corpus:
        base.append(f"data.source={write_corpus(tmp_path / 'corpus', n_docs=120)}")
    cfg = config_lib.apply_overrides(cfg, base + list(overrides))
    return train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)


def final_eval(result) -> dict[str, float]:
    return result.eval_metrics[max(result.eval_metrics)]


def test_masked_lm_beats_the_unigram_baseline(tmp_path):
    r = run(tmp_path, presets.bert(**SMALL), "objective.kind=masked_lm", "data.seq_len=64",
            "train.steps=120", "train.lr=3e-3", "eval.every=120")
    ev = final_eval(r)
    assert ev["loss"] < r.unigram_baseline - 0.5, (ev, r.unigram_baseline)
    assert ev["accuracy"] > 0.2, ev


def test_prefix_lm_learns_the_continuation(tmp_path):
    r = run(tmp_path, presets.prefix_lm(**SMALL), "objective.kind=prefix_lm", "data.seq_len=64",
            "train.steps=120", "train.lr=3e-3", "eval.every=120")
    assert final_eval(r)["loss"] < r.unigram_baseline - 1.0, (final_eval(r), r.unigram_baseline)


def test_span_corruption_learns_the_spans(tmp_path):
    r = run(tmp_path, presets.t5_v1_1(**SMALL), "objective.kind=span_corruption",
            "data.seq_len=64", "train.steps=120", "train.lr=3e-3", "eval.every=120")
    ev = final_eval(r)
    assert ev["loss"] < r.unigram_baseline - 1.0, (ev, r.unigram_baseline)
    assert ev["accuracy"] > 0.3, ev


def test_transformer_2017_learns_to_reverse(tmp_path, capsys):
    model = presets.transformer_2017(n_layers=2, d_model=128, n_heads=4, d_ff=256,
                                     vocab_size=64, max_len=32)
    r = run(tmp_path, model, "objective.kind=seq2seq", "data.source=synthetic:reverse",
            "data.seq_len=17", "objective.label_smoothing=0.1", "train.schedule=inverse_sqrt",
            "train.lr=0.3", "train.warmup_steps=150", "train.batch_size=32", "train.steps=400",
            # The paper's Adam betas (0.9, 0.98), as in experiments/transformer_2017.py. With
            # the default beta2=0.95 the loss spiked near step 500 and the final accuracy swung
            # from 0.95 to 0.72 on a last-bit change in the rounding of the update.
            # 400 steps: eval at 300 gave accuracy 0.88-0.93 and exact match 0.56, at 400
            # 0.97-0.98 and 0.81 (two roundings of the same run: default and unoptimized XLA
            # CPU code); the schedule does not depend on train.steps, so 400 is a prefix of 500.
            "train.beta2=0.98", "eval.every=400", "eval.batches=4", corpus=False)
    ev = final_eval(r)
    assert ev["accuracy"] > 0.9, ev  # per target token
    assert ev["exact_match"] > 0.5, ev  # whole sequences, greedy decoding
    # `jaxformer sample` on the run (sources as symbol numbers, one batch): most of 8 new
    # sources come back reversed in the target alphabet.
    rng = np.random.default_rng(7)
    sources = [rng.integers(0, 24, rng.integers(4, 12)).tolist() for _ in range(8)]
    args = ["sample", str(tmp_path / "run"), "--temperature", "0", "--max-new-tokens", "16"]
    for src in sources:
        args += ["--prompt", " ".join(map(str, src))]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().split("\n\n")
    want = [" ".join(f"t{s}" for s in reversed(src)) for src in sources]
    assert sum(p == w for p, w in zip(printed, want, strict=True)) >= 5, (printed, want)


@pytest.mark.parametrize("bad, message", [
    (["objective.kind=span_corruption"], "trains model.arch='encoder_decoder'"),
    (["model.arch=encoder", "objective.kind=masked_lm", "objective.mask_rate=1.5"],
     "mask rate must be in (0, 1)"),
    (["model.arch=encoder_decoder", "objective.kind=span_corruption", "data.seq_len=2",
      "model.max_len=8"], "too short"),
])
def test_objective_that_does_not_fit_is_a_config_error(bad, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.apply_overrides(Config(), bad)


def test_classifier_beats_the_majority_class(tmp_path):
    """Which stdlib package a snippet comes from, from scratch: held-out files only."""
    model = presets.bert(**{**SMALL, "vocab_size": 1000}, num_labels=4)
    r = run(tmp_path, model, "objective.kind=classification", "data.source=stdlib",
            "data.seq_len=64", "train.steps=300", "train.lr=2e-3", "eval.every=300",
            "eval.batches=16", corpus=False)
    ev = final_eval(r)
    assert r.unigram_baseline == 0.25  # balanced held-out classes
    assert ev["accuracy"] > 0.4, ev


def test_two_tower_retrieval_beats_chance(tmp_path):
    """experiments/lra_retrieval.py, shortened: do two held-out stdlib files come from the same
    package? All 256 held-out pairs (half match; one standard error at chance is 3.1 points).
    With a linear head over [u, v, u*v, u-v] the model stayed at 0.5; the MLP head learns."""
    cfg = config_lib.load_experiment(EXPERIMENTS / "lra_retrieval.py")
    cfg = config_lib.apply_overrides(cfg, [
        "data.seq_len=128", "model.max_len=128", "train.batch_size=16", "train.steps=300",
        "eval.every=300", "eval.batches=0", "log.every=50"])
    r = train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    ev = final_eval(r)
    assert r.unigram_baseline == 0.5
    assert ev["accuracy"] > 0.58, ev


def test_prefix_lm_on_input_target_pairs(tmp_path):
    """A decoder with the source as its bidirectional prefix learns to reverse it."""
    model = presets.prefix_lm(n_layers=2, d_model=64, n_heads=4, vocab_size=64, max_len=40)
    r = run(tmp_path, model, "objective.kind=prefix_lm", "data.source=synthetic:reverse",
            "data.seq_len=34", "train.steps=300", "train.lr=3e-3", "eval.every=300",
            corpus=False)
    ev = final_eval(r)  # target tokens only; chance is 1/24 per symbol
    assert ev["accuracy"] > 0.3 and ev["loss"] < 2.2, ev
