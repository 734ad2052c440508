"""``jaxformer convert``: Hugging Face directory <-> jaxformer run dir.

A converted run dir holds the config, the tokenizer (when the Hugging Face directory has a
``tokenizer.json``) and a step-0 weights-only checkpoint, so ``jaxformer sample`` decodes from
it and ``jaxformer train`` can fine-tune from it (``--set train.init_from=RUN_DIR``). The
model's special tokens go into ``special_tokens.json`` (``jaxformer.runs.specials``: the ids
its generation config, config and tokenizer config name, and its chat template), and the
tokenizer's own files (``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja``) are copied as they came.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tokenizers import Tokenizer

from jaxformer.config import Config, DataConfig, ModelConfig, ObjectiveConfig
from jaxformer.data import images
from jaxformer.errors import UserError
from jaxformer.hf import tokens
from jaxformer.hf.api import from_pretrained, save_pretrained
from jaxformer.runs import rundir, specials
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run

TOKENIZER_FILE = "tokenizer.json"  # the name both transformers and jaxformer use


def _refuse_existing(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out")


def _objective_of(model: ModelConfig) -> str:
    """The objective a converted model is set up to continue training with."""
    if model.arch == "encoder":
        if model.token_labels:
            return "token_classification"
        return "classification" if model.num_labels else "masked_lm"
    return "span_corruption" if model.arch == "encoder_decoder" else "causal"


def _data_config(model: ModelConfig, hf_dir: Path) -> DataConfig:
    """Text: the default source, rows as long as the model takes (up to the default). An
    image classifier (a ViT): the bundled image source of its image shape and classes, since
    a run's config names one; a UserError when none has them."""
    if model.patch_size <= 0:
        return DataConfig(seq_len=min(DataConfig.seq_len, model.max_len))
    shape = (model.image_size, model.image_channels, model.num_labels)
    for name, dims in images.DATASETS.items():
        if dims == shape:
            return DataConfig(source=images.PREFIX + name, seq_len=model.image_tokens)
    have = ", ".join(f"{images.PREFIX}{n} ({s}x{s}x{c}, {k} classes)"
                     for n, (s, c, k) in images.DATASETS.items())
    raise UserError(f"{hf_dir} holds a classifier of {shape[0]}x{shape[0]}x{shape[1]} images "
                    f"with {shape[2]} classes, which no image data source has ({have}); a run "
                    "dir needs one: use jaxformer.hf.from_pretrained(HF_DIR).classify_image "
                    "instead (docs/vision.md)")


def hf_to_run_dir(hf_dir: Path | str, out: Path | str) -> Config:
    """Writes a run dir (config, tokenizer and its files, special tokens, step-0 checkpoint)
    from a transformers directory."""
    hf_dir, out = Path(hf_dir), Path(out)
    _refuse_existing(out)
    model = from_pretrained(hf_dir)  # every check happens before anything is written
    tokenizer = _hf_tokenizer(hf_dir / TOKENIZER_FILE)
    special, chat_template = tokens.imported_special_tokens(
        hf_dir, tokenizer, model.config.vocab_size, model.config.arch == "encoder_decoder")
    cfg = Config(name=out.name, model=model.config,
                 data=_data_config(model.config, hf_dir),
                 objective=ObjectiveConfig(kind=_objective_of(model.config)))
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, cfg)
    if tokenizer is not None:
        shutil.copyfile(hf_dir / TOKENIZER_FILE, out / rundir.TOKENIZER_FILE)
    for name in specials.TOKENIZER_EXTRA_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    specials.write_special_tokens(out, special, chat_template)
    ckpt = Checkpointer(out / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep)
    ckpt.save_params(0, model.params, {"config": rundir.config_lib.to_dict(cfg),
                                       "converted_from": str(hf_dir)})
    ckpt.close()
    return cfg


def run_dir_to_hf(run_dir: Path | str, out: Path | str, step: int | None = None) -> None:
    """Writes a transformers directory from a run dir's latest checkpoint (or ``step``), with
    the run's tokenizer and its special-token ids when the run has one. A run converted from
    a Hugging Face model (or fine-tuned from one) writes the ids of its ``special_tokens.json``
    and the tokenizer files it came with (``tokenizer_config.json``, ...), as they came."""
    run_dir, out = Path(run_dir), Path(out)
    _refuse_existing(out)
    cfg, params = load_run(run_dir, step)
    converted = (run_dir / specials.SPECIAL_TOKENS_FILE).is_file()
    ids = tokens.exported_ids(specials.read_special_tokens(run_dir)) if converted else None
    save_pretrained((cfg.model, params), out, tokenizer=_run_tokenizer(run_dir),
                    special_ids=ids)
    if converted:
        for name in specials.TOKENIZER_EXTRA_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out / name)


def _hf_tokenizer(path: Path, what: str = "") -> Tokenizer | None:
    """The tokenizer in ``path`` (a ``tokenizer.json``; None when there is none)."""
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for an unreadable file
        raise UserError(f"cannot read {what}{path}: {str(e).strip()[:200]}") from e


def _run_tokenizer(run_dir: Path) -> Tokenizer | None:
    return _hf_tokenizer(run_dir / rundir.TOKENIZER_FILE, "the run's tokenizer ")
