"""A tiny run on the synthetic corpus must learn: validation loss far below unigram."""

from __future__ import annotations

import json

import tensorboardX  # noqa: F401  (the writer the run uses; the reader below is TensorBoard's)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.train.loop import train
from tests.corpus import write_corpus


def test_tiny_run_learns_and_leaves_a_complete_run_dir(tmp_path):
    source = str(write_corpus(tmp_path / "corpus", n_docs=120))
    cfg = config_lib.apply_overrides(Config(), [
        f"data.source={source}", "data.seq_len=64", "model.max_len=128", "model.n_layers=2",
        "model.d_model=64", "model.n_heads=4", "model.vocab_size=400", "train.batch_size=16",
        "train.steps=150", "train.warmup_steps=15", "train.lr=3e-3", "checkpoint.every=75",
        "log.every=25", "eval.every=75", "eval.batches=0", "sample.max_new_tokens=30",
        "sample.prompts=[\"def \"]", "sample.temperature=0"])
    result = train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    val = result.evals[150]
    print(f"unigram baseline {result.unigram_baseline:.3f}, final val loss {val:.3f}")
    assert val < 0.4 * result.unigram_baseline
    assert result.losses[150] < 0.5 * result.losses[1]

    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 150
    assert (run / "tokenizer.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "150", "75"]
    assert result.samples and result.samples[0].strip()  # greedy continuation of "def "
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/param_norm",
                "train/tokens_per_sec", "train/mfu_percent", "eval/loss", "eval/perplexity"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("eval/loss")] == [75, 150]
    assert abs(events.Scalars("eval/loss")[-1].value - val) < 1e-5
