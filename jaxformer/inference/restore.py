"""Loading a trained run (config, tokenizer, latest checkpoint) for generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import tokenizers

from jaxformer.config import Config
from jaxformer.data.tokenizer import EOS, load_tokenizer
from jaxformer.errors import UserError
from jaxformer.inference.sampling import Generator
from jaxformer.parallel.mesh import make_mesh
from jaxformer.train import rundir
from jaxformer.train.checkpoint import Checkpointer
from jaxformer.train.optimizer import make_optimizer
from jaxformer.train.state import abstract_model, abstract_train_state, looped


def load_run(run_dir: Path, step: int | None = None) -> tuple[Config, dict[str, Any]]:
    """-> (the run's config, the parameters of its latest checkpoint or of ``step``), with the
    blocks as a list (a run trained with scanned layers comes back with scan_layers off)."""
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    if cfg is None:
        raise UserError(f"{run_dir} is not a jaxformer run dir (no {rundir.CONFIG_FILE})")
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep)
    try:
        if ckpt.latest_step() is None:
            raise UserError(f"{run_dir} has no checkpoint yet")
        if step is not None and step not in ckpt.manager.all_steps():
            raise UserError(f"{run_dir} has no checkpoint at step {step} "
                            f"(have {sorted(ckpt.manager.all_steps())})")
        mesh = make_mesh(cfg.mesh.__class__(data=1), jax.devices()[:1])
        target = abstract_train_state(cfg.model, make_optimizer(cfg.train, cfg.model.d_model), mesh)
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    model_cfg, _, params = looped(cfg.model, state.params)
    return dataclasses.replace(cfg, model=model_cfg), params


def load_generator(run_dir: Path, step: int | None = None
                   ) -> tuple[Generator, tokenizers.Tokenizer, int]:
    """-> (generator over the checkpoint's parameters, the run's tokenizer, its EOS id)."""
    run_dir = Path(run_dir)
    tok_path = run_dir / rundir.TOKENIZER_FILE
    saved = rundir.read_config(run_dir)
    if saved is not None and saved.model.arch != "decoder":
        raise UserError(f"sampling continues text with a decoder-only model; {run_dir} holds "
                        f"model.arch={saved.model.arch!r}")
    if saved is not None and not tok_path.exists():
        raise UserError(f"{run_dir} has no {rundir.TOKENIZER_FILE}")
    cfg, params = load_run(run_dir, step)
    graphdef, _ = abstract_model(cfg.model)
    tokenizer = load_tokenizer(tok_path)
    generator = Generator(graphdef, params, cfg.model.max_len)
    return generator, tokenizer, tokenizer.token_to_id(EOS)
