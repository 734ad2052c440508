"""Tasks: the data of a run turned into model batches by its objective.

``build_task(cfg)`` reads ``objective.kind`` and ``data.source`` and returns a ``Task`` with
``train_batch(step)`` (a pure function of (seed, step)), ``val_batches()`` and a baseline to
compare with. Batches are dicts of numpy arrays:

    every objective  inputs, targets, loss_weights, segment_ids, positions   [B, T]
    prefix_lm        + prefix [B, T] (1 = token of its document's bidirectional prefix)
    encoder-decoder  + enc_inputs, enc_segment_ids, enc_positions            [B, S]
    classification   targets, loss_weights [B, 1] (one label per row)

Each row's randomness (masking, split points, noise spans) comes from
``default_rng([seed, step, row])``, so a row does not depend on the batch size of a process
or on how many processes share the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import Config
from jaxformer.data.classification import PackageSnippets
from jaxformer.data.errors import DataError
from jaxformer.data.packing import stack_examples
from jaxformer.data.pipeline import DataPipeline
from jaxformer.data.synthetic import EOS_ID, PAD_ID, SyntheticTranslation, is_synthetic
from jaxformer.data.tokenizer import PAD, eos_id
from jaxformer.objectives import masked_lm, prefix_lm, span_corruption
from jaxformer.objectives.specials import MASK, extra_special_tokens, sentinel

Batch = dict[str, np.ndarray]
# A sentinel step for validation rows, far from any training step.
_VAL_STEP = 2**31 - 1


@dataclasses.dataclass
class Task:
    """What the train loop needs from the data, whatever the objective."""

    name: str
    # (step, batch_size, seed, share, n_shares) -> rows [share * B/n, (share + 1) * B/n) of
    # the global batch of the step (one process's share; (0, 1): the whole batch)
    train_batch: Callable[[int, int, int, int, int], Batch]
    val_batches: Callable[[int, int | None], Iterator[Batch]]  # (batch_size, max_batches)
    baseline_name: str  # "unigram" (nats/token) or "majority class" (accuracy)
    baseline: float
    tokenizer: Tokenizer | None = None
    pipeline: DataPipeline | None = None  # the text pipeline behind LM objectives
    translation: SyntheticTranslation | None = None


def build_task(cfg: Config, tokenizer_path: Path, log: Callable[[str], None]) -> Task:
    """The task of ``cfg`` (its tokenizer loaded from ``tokenizer_path`` when that exists)."""
    kind, d = cfg.objective.kind, cfg.data
    if kind == "seq2seq":
        if not is_synthetic(d.source):
            raise DataError(f"objective.kind='seq2seq' reads synthetic:<task> sources; got "
                            f"data.source={d.source!r}")
        return _translation_task(cfg, log)
    if is_synthetic(d.source):
        if kind == "prefix_lm":
            return _pair_prefix_task(cfg, log)
        raise DataError(f"data.source={d.source!r} is a pair task; set objective.kind=seq2seq "
                        "(encoder-decoder) or prefix_lm (decoder)")
    seq_len = d.seq_len
    if kind == "span_corruption":
        o = cfg.objective
        seq_len, _ = span_corruption.resolve_lengths(d.seq_len, o.targets_len, o.noise_density,
                                                     o.mean_span_length,
                                                     len(extra_special_tokens(kind)))
    pipeline = DataPipeline.create(
        source=d.source, seq_len=seq_len, vocab_size=cfg.model.vocab_size,
        val_fraction=d.val_fraction, seed=d.seed, tokenizer_path=tokenizer_path,
        text_field=d.text_field, cache_dir=d.cache_dir or None, log=log,
        extra_special_tokens=extra_special_tokens(kind))
    if kind == "classification":
        return _classification_task(cfg, pipeline, log)
    transform = _row_transform(cfg, pipeline.tokenizer)
    return Task(
        name=kind,
        train_batch=lambda step, b, seed, share=0, n=1: _map_rows(
            pipeline.train_batch(step, b, seed, share, n).as_dict(), transform, seed, step,
            share_rows(b, share, n).start),
        val_batches=lambda b, n: (
            _map_rows(batch.as_dict(), transform, cfg.train.seed, _VAL_STEP + k, 0)
            for k, batch in enumerate(pipeline.val_batches(b, n))),
        baseline_name="unigram", baseline=pipeline.unigram_baseline(),
        tokenizer=pipeline.tokenizer, pipeline=pipeline)


def share_rows(batch_size: int, share: int, n_shares: int) -> range:
    """The global row indices of share ``share`` of ``n_shares`` of a batch."""
    local = batch_size // n_shares
    return range(share * local, (share + 1) * local)


def _map_rows(batch: Batch, transform: Callable[[Batch, np.random.Generator], Batch] | None,
              seed: int, step: int, first_row: int) -> Batch:
    """Applies the per-row transform with the row's own generator (identity: causal); row b
    of ``batch`` is row ``first_row + b`` of the global batch."""
    if transform is None:
        return batch
    rows = []
    for b in range(len(batch["inputs"])):
        row = {k: v[b] for k, v in batch.items()}
        out = transform(row, np.random.default_rng([seed, step, first_row + b]))
        if not row["loss_weights"].any():  # a padding row of a validation batch stays silent
            out["loss_weights"] = np.zeros_like(out["loss_weights"])
        rows.append(out)
    return stack_examples(rows)


def _token_id(tokenizer: Tokenizer, token: str, kind: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise DataError(f"objective.kind={kind!r} needs the special token {token!r}, which the "
                        "tokenizer lacks (a tokenizer trained for another objective?)")
    return tid


def _row_transform(cfg: Config, tok: Tokenizer
                   ) -> Callable[[Batch, np.random.Generator], Batch] | None:
    o, kind = cfg.objective, cfg.objective.kind
    if kind == "causal":
        return None
    if kind == "prefix_lm":
        def prefix(row: Batch, rng: np.random.Generator) -> Batch:
            return prefix_lm.prefix_example(
                row["inputs"], row["targets"], row["segment_ids"], row["positions"],
                row["loss_weights"], rng, min_prefix_frac=o.prefix_min,
                max_prefix_frac=o.prefix_max)
        return prefix
    specials = [tok.token_to_id(t) for t in tok.get_vocab() if _is_special(tok, t)]
    if kind == "masked_lm":
        mask_id = _token_id(tok, MASK, kind)
        starts = masked_lm.word_starts_from_tokenizer(tok) if o.whole_word else None

        def mask(row: Batch, rng: np.random.Generator) -> Batch:
            return masked_lm.mask_example(
                row["inputs"], row["segment_ids"], rng, mask_rate=o.mask_rate,
                mask_token_prob=o.mask_token_prob, random_token_prob=o.random_token_prob,
                mask_id=mask_id, vocab_size=tok.get_vocab_size(), special_ids=specials,
                word_starts=None if starts is None else starts[row["inputs"]])
        return mask
    if kind == "span_corruption":
        sentinels = [_token_id(tok, sentinel(i), kind)
                     for i in range(len(extra_special_tokens(kind)))]
        eos, pad = eos_id(tok), _token_id(tok, PAD, kind)
        _, targets_len = span_corruption.resolve_lengths(
            cfg.data.seq_len, o.targets_len, o.noise_density, o.mean_span_length,
            len(sentinels))

        def corrupt(row: Batch, rng: np.random.Generator) -> Batch:
            return span_corruption.span_corruption_example(
                row["inputs"], rng, noise_density=o.noise_density,
                mean_noise_span_length=o.mean_span_length, sentinel_ids=sentinels,
                eos_id=eos, pad_id=pad, decoder_start_id=pad, inputs_length=cfg.data.seq_len,
                targets_length=targets_len)
        return corrupt
    raise ValueError(f"no row transform for objective {kind!r}")


def _is_special(tok: Tokenizer, token: str) -> bool:
    """Added special tokens (EOS, PAD, mask, sentinels)."""
    return token.startswith("<|") and token.endswith("|>")


def _classification_task(cfg: Config, pipeline: DataPipeline,
                         log: Callable[[str], None]) -> Task:
    data = PackageSnippets.create(pipeline.tokenizer, cfg.model.num_labels, cfg.data.seq_len,
                                  seed=cfg.data.seed)
    log(f"classification: which stdlib package a snippet comes from: {', '.join(data.classes)}")
    return Task(name="classification",
                train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                    step, b, seed, share_rows(b, share, n)),
                val_batches=lambda b, n: data.val_batches(b, n or 16),
                baseline_name="majority class", baseline=1.0 / len(data.classes),
                tokenizer=pipeline.tokenizer, pipeline=pipeline)


def _pair_prefix_task(cfg: Config, log: Callable[[str], None]) -> Task:
    """Input -> target pairs for a decoder: ``source EOS target EOS`` in one row, the source
    (and its EOS) the bidirectional prefix, the loss on the target."""
    task = _translation_task(cfg, log).translation
    assert task is not None

    def row(src: np.ndarray) -> Batch:
        return prefix_lm.prefix_example_from_pair(
            task.source_ids(src), task.target_ids(task.translate(src)), cfg.data.seq_len,
            EOS_ID, PAD_ID)

    def train_batch(step: int, b: int, seed: int, share: int = 0, n: int = 1) -> Batch:
        return stack_examples([row(task.sample(np.random.default_rng([seed, step, r]), False))
                               for r in share_rows(b, share, n)])

    def val_batches(b: int, n: int | None) -> Iterator[Batch]:
        sources = task.heldout_sources(b * (n or 16))
        for k in range(n or 16):
            yield stack_examples([row(s) for s in sources[k * b:(k + 1) * b]])

    return Task(name="prefix_lm", train_batch=train_batch, val_batches=val_batches,
                baseline_name="unigram", baseline=float("nan"))


def _translation_task(cfg: Config, log: Callable[[str], None]) -> Task:
    from jaxformer.data.synthetic import vocab_size

    task = SyntheticTranslation.create(cfg.data.source, cfg.data.seq_len)
    if cfg.model.vocab_size < vocab_size():
        raise DataError(f"{cfg.data.source} needs model.vocab_size >= {vocab_size()}")
    log(f"data: {cfg.data.source}, generated per step (no tokenizer)")
    return Task(name="seq2seq",
                train_batch=lambda step, b, seed, share=0, n=1: task.train_batch(
                    step, b, seed, share_rows(b, share, n)),
                val_batches=lambda b, n: task.val_batches(b, n or 16),
                baseline_name="unigram", baseline=float("nan"), translation=task)
