"""A run's special tokens: which ids begin a prompt, end generation, pad, start a decoder.

A run dir made by ``jaxformer convert --from-hf`` carries the model's own ``tokenizer.json``
and, in ``special_tokens.json``, the ids its Hugging Face files name (``jaxformer.hf.tokens``
reads them: generation config over model config over the tokenizer's config, as transformers
does), with its chat template when it has one; ``tokenizer_config.json``,
``special_tokens_map.json`` and ``chat_template.jinja`` are copied as they came. A run trained
by jaxformer has no such file: its tokenizer's own EOS and PAD are found by name
(``jaxformer.data.special_tokens.of_jaxformer_tokenizer``). Sampling, fine-tuning
(``train.init_from`` copies these files into the new run) and evaluation read them here.

Typical use (``sample``)::

    tokenizer, specials = load_run_tokenizer(run_dir)
    ids = encode_prompt(tokenizer, specials, prompt)       # [bos] + text ids when add_bos
    new = generate(ids, ..., stop at specials.eos_ids)
    text = tokenizer.decode(until_eos(new, specials))
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jaxformer.data import special_tokens as _format
from jaxformer.data.special_tokens import SPECIAL_TOKENS_FILE, SpecialTokens
from jaxformer.data.synthetic import EOS_ID, PAD_ID, is_synthetic
from jaxformer.data.tokenizer import load_tokenizer
from jaxformer.errors import UserError
from jaxformer.runs import rundir

__all__ = ["SPECIAL_TOKENS_FILE", "TOKENIZER_EXTRA_FILES", "SpecialTokens",
           "copy_tokenizer_files", "encode_prompt", "load_run_tokenizer", "read_chat_template",
           "read_special_tokens", "until_eos", "write_special_tokens"]

# What a Hugging Face tokenizer comes with besides tokenizer.json, kept as it came (a later
# server or an export back to transformers uses them; jaxformer reads special_tokens.json).
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja")


def read_special_tokens(run_dir: Path, tokenizer: tokenizers.Tokenizer | None = None
                        ) -> SpecialTokens:
    """The special tokens of the run in ``run_dir``: its ``special_tokens.json`` (a converted
    Hugging Face model, or a run fine-tuned from one), else those of its own tokenizer
    (``tokenizer``, or the run's ``tokenizer.json`` when None) by jaxformer's names; a run on a
    synthetic task has the fixed ids of ``jaxformer.data.synthetic``. The decoder start is
    set for encoder-decoder runs only. A UserError when the run has no tokenizer to read."""
    run_dir = Path(run_dir)
    found = _format.read_file(run_dir)
    if found is not None:
        return found[0]
    cfg = rundir.read_config(run_dir)
    encoder_decoder = cfg is not None and cfg.model.arch == "encoder_decoder"
    if tokenizer is None and cfg is not None and is_synthetic(cfg.data.source):
        return SpecialTokens(bos_id=EOS_ID, eos_ids=(EOS_ID,), pad_id=PAD_ID,
                             decoder_start_id=PAD_ID if encoder_decoder else None, add_bos=False)
    if tokenizer is None:
        path = run_dir / rundir.TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"{run_dir} has no {rundir.TOKENIZER_FILE}")
        tokenizer = load_tokenizer(path)
    return _format.of_jaxformer_tokenizer(tokenizer, encoder_decoder)


def load_run_tokenizer(run_dir: Path) -> tuple[tokenizers.Tokenizer, SpecialTokens]:
    """-> (the run's tokenizer, its special tokens): a converted Hugging Face tokenizer as it
    came, or one jaxformer trained. A UserError when the run has no ``tokenizer.json``."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {rundir.TOKENIZER_FILE}")
    found = _format.read_file(run_dir)
    tokenizer = load_tokenizer(path, require_eos=found is None)
    return tokenizer, (found[0] if found is not None else read_special_tokens(run_dir, tokenizer))


def write_special_tokens(run_dir: Path, specials: SpecialTokens,
                         chat_template: Any = None) -> None:
    """Writes ``run_dir/special_tokens.json`` (with the model's chat template, kept as
    transformers stores it: a string, or a list of named templates)."""
    _format.write_file(Path(run_dir), specials, chat_template)


def read_chat_template(run_dir: Path) -> Any:
    """The chat template a converted model came with (None: it had none, or the run was not
    converted): ``chat_template.jinja`` when present (transformers prefers it), else the one in
    ``special_tokens.json``."""
    run_dir = Path(run_dir)
    jinja = run_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    found = _format.read_file(run_dir)
    return None if found is None else found[1]


def copy_tokenizer_files(source: Path, run_dir: Path) -> list[str]:
    """Copies ``special_tokens.json`` and ``TOKENIZER_EXTRA_FILES`` that ``source`` has into
    ``run_dir`` (a fine-tune keeps the tokenizer of its weights); -> the names copied."""
    copied = []
    for name in (SPECIAL_TOKENS_FILE, *TOKENIZER_EXTRA_FILES):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(run_dir) / name)
            copied.append(name)
    return copied


def encode_prompt(tokenizer: tokenizers.Tokenizer, specials: SpecialTokens,
                  text: str) -> list[int]:
    """The ids a decoder continues ``text`` from: the text's tokens (no special tokens added
    by the tokenizer's post-processor), after ``bos_id`` when ``add_bos``; ``[bos_id]`` (or
    the end token) alone for an empty text, so generation starts a new document."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids if text else []
    if specials.add_bos or not ids:
        start = specials.bos_id if specials.bos_id is not None else specials.eos_id
        if start is not None:
            ids = [start, *ids]
    return ids


def until_eos(ids: Sequence[int], specials: SpecialTokens) -> list[int]:
    """``ids`` up to (not including) the first of ``specials.eos_ids``."""
    out = []
    for i in ids:
        if int(i) in specials.eos_ids:
            break
        out.append(int(i))
    return out
