"""Loading a trained run (config, tokenizer, latest checkpoint) for generation."""

from __future__ import annotations

from pathlib import Path

import jax
import tokenizers

from jaxformer.data.tokenizer import EOS, load_tokenizer
from jaxformer.errors import UserError
from jaxformer.inference.sampling import Generator
from jaxformer.parallel.mesh import make_mesh
from jaxformer.train import rundir
from jaxformer.train.checkpoint import Checkpointer
from jaxformer.train.optimizer import make_optimizer
from jaxformer.train.state import abstract_model, abstract_train_state


def load_generator(run_dir: Path, step: int | None = None
                   ) -> tuple[Generator, tokenizers.Tokenizer, int]:
    """-> (generator over the checkpoint's parameters, the run's tokenizer, its EOS id)."""
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    if cfg is None:
        raise UserError(f"{run_dir} is not a jaxformer run dir (no {rundir.CONFIG_FILE})")
    tok_path = run_dir / rundir.TOKENIZER_FILE
    if not tok_path.exists():
        raise UserError(f"{run_dir} has no {rundir.TOKENIZER_FILE}")
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep)
    if ckpt.latest_step() is None:
        raise UserError(f"{run_dir} has no checkpoint yet")
    if step is not None and step not in ckpt.manager.all_steps():
        raise UserError(f"{run_dir} has no checkpoint at step {step} "
                        f"(have {sorted(ckpt.manager.all_steps())})")
    mesh = make_mesh(cfg.mesh.__class__(data=1), jax.devices()[:1])
    target = abstract_train_state(cfg.model, make_optimizer(cfg.train), mesh)
    state, _ = ckpt.restore(target, step)
    ckpt.close()
    graphdef, _ = abstract_model(cfg.model)
    tokenizer = load_tokenizer(tok_path)
    generator = Generator(graphdef, state.params, cfg.model.max_len)
    return generator, tokenizer, tokenizer.token_to_id(EOS)
