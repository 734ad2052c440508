"""A trained run's generator: its weights (``jaxformer.runs.restore``) and tokenizer."""

from __future__ import annotations

from pathlib import Path

import tokenizers

from jaxformer.data.tokenizer import EOS, load_tokenizer
from jaxformer.errors import UserError
from jaxformer.inference.sampling import Generator
from jaxformer.models.build import abstract_model
from jaxformer.runs import rundir
from jaxformer.runs.restore import load_run


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
