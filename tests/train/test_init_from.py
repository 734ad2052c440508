"""``train.init_from`` takes the source's architecture: a fine-tune of a run (or a Hugging Face
directory) whose sizes and block choices all differ from the experiment's trains with no model
key retyped; a key set on the command line stays; a model that does not fit names the keys.
Through the real training set-up (``jaxformer.train.loop.train``) on tiny runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.config import Config, DataConfig, ModelConfig
from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer
from jaxformer.errors import UserError
from jaxformer.models.build import init_params
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run
from jaxformer.train.init_from import (
    ARCHITECTURE_KEYS,
    explicit_keys,
    model_from_source,
    source_model,
)
from jaxformer.train.loop import train
from tests.corpus import document, write_corpus


def arch(model: ModelConfig) -> dict[str, object]:
    return {k: getattr(model, k) for k in ARCHITECTURE_KEYS}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run dir as training leaves it (config, tokenizer, weights) of a Llama-style model:
    every size and block choice differs from the default experiment's GPT-2 layout."""
    tmp = tmp_path_factory.mktemp("init_from")
    rng = np.random.default_rng(0)
    tok = train_tokenizer([document(rng, i) for i in range(40)], 300)
    model = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                        vocab_size=tok.get_vocab_size(), max_len=64, pos_encoding="rope",
                        norm="rmsnorm", activation="swiglu", use_bias=False,
                        tie_embeddings=False)
    cfg = Config(name="source", model=model, data=DataConfig(seq_len=32))
    run = tmp / "source"
    run.mkdir()
    rundir.write_config(run, cfg)
    save_tokenizer(tok, run / rundir.TOKENIZER_FILE)
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, 1)
    ckpt.save_params(0, init_params(model, seed=3), {"config": rundir.config_lib.to_dict(cfg)})
    ckpt.close()
    return run, write_corpus(tmp / "corpus", n_docs=20)


def fine_tune_args(source_dir, corpus) -> list[str]:
    """What a user types after `jaxformer train EXPERIMENT`: data and schedule, no model key.
    lr 1e-12: one AdamW step moves a weight by ~1e-12, so the weights after it are the source's
    (a fresh init would differ by ~0.02)."""
    return [f"data.source={corpus}", "data.seq_len=32", "train.batch_size=2", "train.steps=1",
            "train.warmup_steps=0", "train.lr=1e-12", "eval.every=1", "eval.batches=1",
            "sample.count=0", f"train.init_from={source_dir}"]


def test_fine_tune_takes_the_sources_architecture(source, tmp_path):
    source_dir, corpus = source
    overrides = fine_tune_args(source_dir, corpus)
    cfg = config_lib.apply_overrides(Config(), overrides)  # the default GPT-2 experiment
    assert arch(cfg.model) != arch(source_model(source_dir))
    cfg, note = model_from_source(cfg, explicit_keys(overrides))
    assert "d_model 256 -> 32" in note and "pos_encoding 'learned' -> 'rope'" in note
    result = train(cfg, tmp_path / "ft", progress=False, echo=lambda s: None)
    assert result.final_step == 1
    tuned_cfg, tuned = load_run(tmp_path / "ft")
    assert arch(tuned_cfg.model) == arch(source_model(source_dir))
    _, original = load_run(source_dir)
    same = jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-9)), tuned, original)
    assert all(jax.tree.leaves(same))
    # The experiment's own choices stay (dropout is not the source's to decide).
    cfg2, _ = model_from_source(config_lib.apply_overrides(cfg, ["model.dropout=0.1"]))
    assert cfg2.model.dropout == 0.1


def test_a_key_set_on_the_command_line_is_kept_and_the_misfit_names_it(source, tmp_path):
    source_dir, corpus = source
    overrides = [*fine_tune_args(source_dir, corpus), "model.n_layers=1"]
    cfg = config_lib.apply_overrides(Config(), overrides)
    cfg, _ = model_from_source(cfg, explicit_keys(overrides))
    assert cfg.model.n_layers == 1 and cfg.model.d_model == 32
    with pytest.raises(UserError) as e:
        train(cfg, tmp_path / "ft", progress=False, echo=lambda s: None)
    message = str(e.value)
    assert "does not fit the model" in message and "\n" not in message
    assert "the source has model.n_layers=2: set these" in message  # only the key that differs
    assert not (tmp_path / "ft").exists()


def test_without_the_sources_architecture_the_error_names_every_key_to_set(source, tmp_path):
    source_dir, corpus = source
    cfg = config_lib.apply_overrides(Config(), fine_tune_args(source_dir, corpus))
    with pytest.raises(UserError) as e:
        train(cfg, tmp_path / "ft", progress=False, echo=lambda s: None)
    hint = str(e.value).split("; the source has ", 1)[1]
    named = dict(item.split("=", 1) for item in hint.split(":", 1)[0].split())
    their = source_model(source_dir)
    assert named == {f"model.{k}": str(v).lower() if isinstance(v, bool) else str(v)
                     for k, v in arch(their).items() if getattr(cfg.model, k) != v}
    assert {"model.d_model", "model.n_layers", "model.n_kv_heads", "model.pos_encoding",
            "model.tie_embeddings", "model.vocab_size"} <= set(named)
    # Setting exactly those keys makes the same experiment fit.
    fitted = config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in named.items()])
    assert arch(fitted.model) == arch(their)


def test_a_source_that_makes_the_config_invalid_is_one_clear_error(source):
    source_dir, corpus = source
    overrides = [*fine_tune_args(source_dir, corpus), "data.seq_len=128"]
    cfg = config_lib.apply_overrides(Config(), overrides)
    with pytest.raises(UserError, match=r"with the architecture of .*data\.seq_len=128 exceeds "
                                        r"model\.max_len=64"):
        model_from_source(cfg, explicit_keys(overrides))


def test_a_resumed_run_whose_source_is_gone_keeps_the_recorded_architecture(source, tmp_path):
    source_dir, _ = source
    run = tmp_path / "run"
    run.mkdir()
    recorded = Config(model=source_model(source_dir), data=DataConfig(seq_len=32))
    rundir.write_config(run, recorded)
    cfg = config_lib.apply_overrides(Config(), ["data.seq_len=32",
                                                f"train.init_from={tmp_path / 'gone'}"])
    taken, _ = model_from_source(cfg, run_dir=run)
    assert arch(taken.model) == arch(recorded.model)
    with pytest.raises(UserError, match="gone is not a directory"):
        model_from_source(cfg)
    assert model_from_source(Config()) == (Config(), "")  # no init_from: unchanged


def test_the_architecture_of_a_hugging_face_directory(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxformer.hf import from_pretrained

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=3, n_head=2)).save_pretrained(
        tmp_path / "hf")
    cfg = config_lib.apply_overrides(Config(), ["data.seq_len=32",
                                                f"train.init_from={tmp_path / 'hf'}"])
    taken, note = model_from_source(cfg)
    assert arch(taken.model) == arch(from_pretrained(tmp_path / "hf").config)
    assert (taken.model.n_layers, taken.model.d_model, taken.model.vocab_size,
            taken.model.max_len) == (3, 32, 300, 64)
    assert "n_layers 4 -> 3" in note
