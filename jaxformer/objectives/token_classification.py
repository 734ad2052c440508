"""Token classification (BERT's ``BertForTokenClassification``): one label per token from an
encoder's per-token head (``model.token_labels``).

The data: Python source (``data.source``: the stdlib, or any directory of ``.py`` files) tagged
with each token's lexical category from the standard library's ``tokenize``
(``jaxformer.data.python_tags``: keyword, name, number, string, operator, comment). Batches
hold targets [B, T] (the category index) and loss_weights [B, T], 0 on padding and on tokens
without a category (whitespace, line breaks), so the weighted cross-entropy and the eval
``accuracy`` (correct / weighted tokens) are per labelled token. Held-out documents are the
text pipeline's (``data.val_fraction``); the baseline is the held-out accuracy of always
answering the most frequent training category.
"""

from __future__ import annotations

from pathlib import Path

from jaxformer import config as config_lib
from jaxformer.config import Config, ConfigError
from jaxformer.data import captions, images, lra, python_tags, speech_task, synthetic
from jaxformer.objectives.base import Log, Objective, Task
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import share_rows, text_pipeline

KIND = "token_classification"
_NOT_TEXT = {lra.PREFIX: "a classification task of its own", images.PREFIX: "images",
             speech_task.PREFIX: "audio", captions.PREFIX: "images with captions",
             synthetic.PREFIX: "a generated pair task"}


@register
class TokenClassification(Objective):
    """Its logits are the base class's: the encoder's per-token call, which with a token head
    gives [B, T, L] aligned with targets [B, T]."""

    name = KIND
    arch = "encoder"

    def check(self, cfg: Config) -> None:
        m, n = cfg.model, len(python_tags.CATEGORIES)
        if m.token_labels != n:
            raise ValueError(f"objective.kind={KIND!r} tags Python tokens with {n} categories "
                             f"({', '.join(python_tags.CATEGORIES)}): it needs "
                             f"model.token_labels={n}, got {m.token_labels}")
        if m.num_labels or m.patch_size > 0 or m.two_tower:
            raise ValueError(f"objective.kind={KIND!r} reads tokens with a per-token head "
                             f"only: set model.num_labels=0, model.patch_size=0 and "
                             f"model.two_tower=false (got {m.num_labels}, {m.patch_size}, "
                             f"{str(m.two_tower).lower()})")
        for prefix, what in _NOT_TEXT.items():
            if cfg.data.source.startswith(prefix):
                raise ValueError(f"data.source={cfg.data.source!r} holds {what}, not Python "
                                 "source; use data.source=stdlib or a directory of .py files")

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        pipeline = text_pipeline(cfg, tokenizer_path, log)
        d = cfg.data
        tagged, n_docs = python_tags.load_tagged(d.source, pipeline.tokenizer, d.text_field,
                                                 d.cache_dir or None, log)
        pad = pipeline.pad_id if pipeline.pad_id is not None else pipeline.eos_id
        data = python_tags.PythonTags.create(tagged, n_docs, pipeline.train_doc_ids,
                                             pipeline.val_doc_ids, d.seq_len, pad, log)
        return Task(name=self.name,
                    train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                        step, b, seed, share_rows(b, share, n)),
                    val_batches=lambda b, n: data.val_batches(b, n),
                    baseline_name="majority class",
                    baseline=data.majority_baseline(cfg.train.batch_size,
                                                    cfg.eval.batches or None),
                    tokenizer=pipeline.tokenizer, pipeline=pipeline)


def check_token_head(cfg: Config) -> None:
    """A per-token head (``model.token_labels`` > 0) has no masked-LM head to train another
    objective with: it is this objective's."""
    if cfg.model.token_labels > 0 and cfg.objective.kind != KIND:
        raise ConfigError(f"model.token_labels={cfg.model.token_labels} (a per-token "
                          f"classification head) needs objective.kind={KIND!r}, got "
                          f"{cfg.objective.kind!r}; set model.token_labels=0")


config_lib.register_check(check_token_head)
