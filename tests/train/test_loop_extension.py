"""The loop's extension points, exercised through ``train``: an objective defined in one
module trains; a caller's hook sees every step; extending a run's length is an explicit
choice of schedule; end-of-run samples start from held-out documents without double spaces."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError
from jaxformer.errors import UserError
from jaxformer.inference.samples import heldout_prompts, prompt_ids
from jaxformer.objectives import OBJECTIVES, Task, register
from jaxformer.objectives.causal import CausalLM
from jaxformer.objectives.tasks import build_task, text_pipeline, text_task
from jaxformer.train.loop import train
from jaxformer.train.optimizer import learning_rate_schedule
from tests.corpus import write_corpus
from tests.train.helpers import run_config

QUIET = {"progress": False, "echo": lambda s: None}


def small(source: str, *extra: str) -> Config:
    return run_config(source, "model.max_len=64", "model.n_layers=1", "train.steps=4",
                      "train.warmup_steps=1", "eval.batches=1", *extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=40))


class EvenPositions(CausalLM):
    """A toy objective: next-token prediction scored on even positions only."""

    name = "even_positions"

    def build_task(self, cfg: Config, tokenizer_path: Path, log) -> Task:
        def even(row, rng):
            weights = row["loss_weights"].copy()
            weights[1::2] = 0.0
            return {**row, "loss_weights": weights}

        return text_task(cfg, text_pipeline(cfg, tokenizer_path, log), even)


@pytest.fixture
def even_objective():
    register(EvenPositions)
    config_lib.register_choices("objective.kind", tuple(OBJECTIVES))
    yield
    del OBJECTIVES["even_positions"]
    config_lib.register_choices("objective.kind", tuple(OBJECTIVES))


def test_an_objective_in_one_module_trains(tmp_path, corpus, even_objective):
    cfg = small(corpus, "objective.kind=even_positions")
    batch = build_task(cfg, tmp_path / "tok.json", lambda s: None).train_batch(0, 4, 0, 0, 1)
    assert batch["loss_weights"][:, 1::2].sum() == 0 and batch["loss_weights"][:, ::2].sum() > 0

    class Targets:
        seen: list[float] = []

        def after_step(self, run, step, metrics):
            self.seen.append(float(metrics["target_tokens"]))

    hook = Targets()
    result = train(cfg, tmp_path / "run", hooks=[hook], **QUIET)
    assert result.final_step == 4 and np.isfinite(result.losses[4])
    # Only even positions count: at most half of the 4 x 32 targets.
    assert len(hook.seen) == 4 and all(0 < n <= 64 for n in hook.seen)


def test_unknown_objective_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'causal'"):
        config_lib.apply_overrides(Config(), ["objective.kind=casual"])


def test_objective_options_are_checked_at_load():
    with pytest.raises(ConfigError, match="objective"):
        config_lib.apply_overrides(Config(), ["model.arch=encoder", "objective.kind=masked_lm",
                                              "objective.mask_rate=1.5"])


def test_extending_a_run_asks_which_schedule(tmp_path, corpus):
    cfg = small(corpus)
    train(cfg, tmp_path / "run", **QUIET)
    longer = small(corpus, "train.steps=8")
    with pytest.raises(UserError, match="train.schedule_steps=4 to keep the old schedule"):
        train(longer, tmp_path / "run", allow_config_change=True, **QUIET)

    keep = small(corpus, "train.steps=8", "train.schedule_steps=4")
    lrs = _lrs_of_resumed_steps(keep, tmp_path / "run", tmp_path / "keep")
    end = cfg.train.lr * cfg.train.min_lr_ratio
    assert np.allclose(lrs, end, rtol=1e-6)  # held at the 4-step schedule's end value

    replan = small(corpus, "train.steps=8", "train.schedule_steps=8")
    lrs = _lrs_of_resumed_steps(replan, tmp_path / "run", tmp_path / "replan")
    schedule = learning_rate_schedule(replan.train, replan.model.d_model)
    assert np.allclose(lrs, [float(schedule(s)) for s in range(4, 8)], rtol=1e-6)
    assert lrs[0] > 2 * end  # the re-planned decay starts above the old end value


def _lrs_of_resumed_steps(cfg: Config, finished: Path, copy: Path) -> list[float]:
    import shutil

    shutil.copytree(finished, copy)

    class LR:
        values: list[float] = []

        def after_step(self, run, step, metrics):
            self.values.append(float(metrics["lr"]))

    hook = LR()
    hook.values = []
    train(cfg, copy, allow_config_change=True, hooks=[hook], **QUIET)
    return hook.values


def test_samples_start_from_heldout_documents_without_double_spaces(tmp_path, corpus):
    cfg = small(corpus)
    data = build_task(cfg, tmp_path / "tok.json", lambda s: None).pipeline
    prompts = heldout_prompts(data, 2)  # this corpus holds out 2 documents
    assert len(prompts) == 2 and all(p.strip() for p in prompts)
    assert heldout_prompts(data, 0) == []
    val = data.val_rows.stream
    first_doc = val.tokens[val.doc_ids == val.doc_ids[0]]
    assert data.decode([t for t in first_doc if t != data.eos_id]).startswith(prompts[0])
    assert all(p.count("\n") <= 1 + p[:len(p) - len(p.lstrip("\n"))].count("\n")
               for p in prompts)  # at most the first line of text
    text, ids = prompt_ids(data, "def ")
    assert text == "def" and ids == [int(t) for t in data.encode("def")]


def test_default_run_samples_from_heldout_documents(tmp_path, corpus):
    cfg = dataclasses.replace(small(corpus), sample=dataclasses.replace(
        Config().sample, count=2, max_new_tokens=4, temperature=0.0))
    result = train(cfg, tmp_path / "run", **QUIET)
    text = (tmp_path / "run" / "samples.txt").read_text()
    assert len(result.samples) == 2 and text.count("--- prompt") == 2
    assert "--- prompt 'def'" not in text  # not the old Python-only default
