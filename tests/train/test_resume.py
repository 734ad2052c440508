"""Resuming is exact: N steps, stop, resume for N more == 2N steps in one go, bitwise on CPU
(same compiled step, same inputs: the batch is a pure function of (seed, step), and the
checkpoint restores every float exactly)."""

from __future__ import annotations

import pytest

from jaxformer.errors import UserError
from jaxformer.train.loop import train
from tests.corpus import write_corpus
from tests.train.helpers import run_config as small_config


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.2", "model.attention_dropout=0.1"]],
                         ids=["deterministic", "dropout"])
def test_resume_is_bitwise_exact(tmp_path, extra):
    """With dropout too: its key is a pure function of (seed, step), like the batch."""
    source = str(write_corpus(tmp_path / "corpus"))
    cfg = small_config(source, *extra)
    whole = train(cfg, tmp_path / "whole", progress=False, echo=lambda s: None)
    first = train(cfg, tmp_path / "split", stop_at=4, progress=False, echo=lambda s: None)
    assert first.final_step == 4 and sorted(first.losses) == [1, 2, 3, 4]
    second = train(cfg, tmp_path / "split", progress=False, echo=lambda s: None)
    assert second.start_step == 4 and sorted(second.losses) == [5, 6, 7, 8]
    resumed = {**first.losses, **second.losses}
    assert resumed == whole.losses  # exact float equality at every step
    assert second.evals[8] == whole.evals[8]


def test_conflicting_config_is_refused_unless_allowed(tmp_path):
    source = str(write_corpus(tmp_path / "corpus"))
    run = tmp_path / "run"
    train(small_config(source), run, stop_at=2, progress=False, echo=lambda s: None)
    saved = (run / "config.json").read_text()
    with pytest.raises(UserError, match=r"model.d_model: 32 -> 64.*--allow-config-change"):
        train(small_config(source, "model.d_model=64"), run, progress=False, echo=lambda s: None)
    assert (run / "config.json").read_text() == saved
    # Changing only logging cadence is not a conflict.
    out = train(small_config(source, "log.every=2"), run, stop_at=3, progress=False,
                echo=lambda s: None)
    assert out.start_step == 2 and out.final_step == 3


def test_checkpoint_of_another_shape_names_the_parameter(tmp_path):
    source = str(write_corpus(tmp_path / "corpus"))
    run = tmp_path / "run"
    train(small_config(source), run, stop_at=2, progress=False, echo=lambda s: None)
    with pytest.raises(UserError, match=r"parameter blocks/0/attn/b_k expected shape \[2, 32\], "
                                        r"found \[2, 16\]"):
        train(small_config(source, "model.d_model=64"), run, allow_config_change=True,
              progress=False, echo=lambda s: None)
