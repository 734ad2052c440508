"""A small mixture-of-experts decoder learns through the real loop and logs its router."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.analysis.events import read_scalars
from jaxformer.config import Config
from jaxformer.models import presets
from tests.corpus import write_corpus

pytestmark = pytest.mark.slow


def test_moe_decoder_learns_and_logs_router_statistics(tmp_path):
    from jaxformer.train.loop import train

    model = presets.gpt2(n_layers=2, d_model=64, n_heads=4, vocab_size=400, max_len=64,
                         n_experts=4, experts_top_k=2, moe_d_ff=128, capacity_factor=1.25,
                         n_shared_experts=1)
    cfg = dataclasses.replace(Config(), model=model)
    cfg = config_lib.apply_overrides(cfg, [
        f"data.source={write_corpus(tmp_path / 'corpus', n_docs=120)}", "data.seq_len=64",
        "data.val_fraction=0.1", "train.batch_size=16", "train.steps=120",
        "train.warmup_steps=10", "train.lr=3e-3", "log.every=10", "eval.every=120",
        "eval.batches=4", "sample.count=0"])
    result = train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    final = result.eval_metrics[120]
    assert final["loss"] < result.unigram_baseline - 1.0, (final, result.unigram_baseline)

    scalars = read_scalars(tmp_path / "run")
    balance = [v for _, v in scalars["train/moe_balance_loss"]]
    dropped = [v for _, v in scalars["train/moe_dropped"]]
    max_load = [v for _, v in scalars["train/moe_max_load"]]
    assert len(balance) == 12
    assert all(0.0 < b <= 4.0 for b in balance)  # E * sum_e f_e P_e <= E * max P <= E
    assert all(0.0 <= d < 1.0 for d in dropped)
    assert all(1.0 - 1e-5 <= m <= 4.0 + 1e-5 for m in max_load)  # 1 = balanced, E = one expert

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"histograms": 0})
    acc.Reload()
    hist = acc.Histograms("train/moe_expert_load")[-1].histogram_value
    counts = np.asarray(hist.bucket)
    assert len(counts) == 4 and abs(counts.sum() - 1.0) < 1e-5  # one bar per expert
