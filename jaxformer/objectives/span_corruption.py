"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4) as a pure numpy data transform.

A random set of contiguous spans of the raw tokens is dropped from the encoder input and each
span is replaced by one unique sentinel; the decoder learns to emit, for each span, its sentinel
followed by the dropped tokens:

    tokens   a b c d e f g h          noise mask  . . X X . . . X
    inputs   a b <0> e f g <1> EOS
    targets  <0> c d <1> h EOS

The functions follow the t5 repository's `t5/data/preprocessors.py` (`random_spans_noise_mask`,
`random_spans_helper`, `noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel`),
rewritten in numpy with an explicit `np.random.Generator` so the transform is deterministic
given the generator's seed.

Letters: L raw token count, S encoder length (inputs_length), T decoder length (targets_length),
N noise tokens, K noise spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxformer.config import Config
from jaxformer.data.tokenizer_kinds import SENTINELS_ROLE, kind_of
from jaxformer.objectives.base import Batch, Log, Objective, Task, encoder_decoder_logits
from jaxformer.objectives.registry import register
from jaxformer.objectives.specials import N_SENTINELS
from jaxformer.objectives.tasks import role_token_ids, text_pipeline, text_task, token_id


def _span_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
    """(N noise tokens, K noise spans) that `random_spans_noise_mask` uses for `length >= 2`.

    Python's round (half to even, on float64) is used everywhere so that the helper and the
    mask agree exactly; T5 rounds half to even too (tf.round), though on float32.
    """
    num_noise = int(round(length * noise_density))
    # At least one noise and one non-noise token, so both span kinds exist.
    num_noise = min(max(num_noise, 1), length - 1)
    # At least one span: a mask with noise tokens but no spans is not defined.
    num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of `num_items` into `num_segments` positive parts.

    -> [num_segments] int64 summing to num_items. As T5's `_random_segmentation`: shuffle
    num_segments-1 "segment starts here" flags among the num_items-1 gaps between items, which
    picks the set of cut points uniformly among all C(num_items-1, num_segments-1) sets, i.e.
    every composition is equally likely.
    """
    first_in_segment = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    # The first item always starts segment 0, hence the leading 0 before the cumulative sum.
    segment_id = np.cumsum(np.concatenate([[0], first_in_segment.astype(np.int64)]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Noise mask with round(density * length) noise tokens in round(noise / mean) spans.

    -> [length] bool, True on noise tokens. Counts are clipped so that there is at least one
    noise token, at least one non-noise token and at least one span. Segments alternate
    non-noise, noise, non-noise, ..., noise: the mask starts with non-noise (mask[0] is False)
    and ends with noise. Lengths below 2 are computed at length 2 and truncated, as in T5, so
    a 1-token sequence gets no noise.
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    orig_length = length
    length = max(length, 2)
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise = length - num_noise
    if num_nonnoise < num_spans:
        # Every noise span needs a non-noise span before it; T5 would fail on a shape mismatch.
        raise ValueError(f"span corruption: {num_spans} noise spans need at least as many "
                         f"non-noise tokens, but length {length} has {num_nonnoise}")
    # Noise lengths first, then non-noise (T5 uses two seeds in this order).
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    # Odd-numbered segments (1, 3, ...) are the noise spans.
    is_noise = np.repeat(np.arange(2 * num_spans) % 2 == 1, interleaved)
    return is_noise[:orig_length]


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float, extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """(raw tokens_length L, targets_length T) such that span corruption of L raw tokens fills
    `inputs_length` encoder positions (EOS included) exactly or as closely as possible.

    As T5's `random_spans_helper`: start from L = inputs_length - 1 and grow L while the
    corrupted inputs (non-noise tokens + extra tokens per span + 1 EOS) of L + 1 still fit;
    T = noise tokens + extra tokens per span + 1 EOS for that L. Corrupted lengths never shrink
    as L grows, so the result is the largest L that fits. Counts are those of
    `random_spans_noise_mask` (noise and span counts clipped to >= 1), which agree with T5's
    unclipped ones except on tiny lengths where T5's helper can overflow by one token.
    Like T5, at density 0.5 one raw token is dropped if the targets would be longer than the
    inputs, so that T equals the (usually round) inputs_length.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        if tokens_length < 2:
            return tokens_length + 1, 1  # the mask has no noise below 2 tokens
        num_noise, num_spans = _span_counts(tokens_length, noise_density, mean_noise_span_length)
        num_nonnoise = tokens_length - num_noise
        return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _span_starts(mask: np.ndarray) -> np.ndarray:
    """mask: [L] bool -> [L] bool, True on the first token of each True run."""
    previous = np.concatenate([[False], mask[:-1]])
    return mask & ~previous


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int],
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace each noise span by one unique sentinel; the targets hold what was removed.

    tokens: [L] int, noise_mask: [L] bool. The k-th noise span (in order) gets sentinel_ids[k].
    -> inputs [L - N + K + 1] int32: non-noise tokens with one sentinel per span, then eos_id;
       targets [N + K + 1] int32: for each span its sentinel then its tokens, then eos_id.
    For T5's masks (start with non-noise, end with noise) this equals T5's
    noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel pair.
    """
    tokens = np.asarray(tokens)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    if tokens.shape != noise_mask.shape or tokens.ndim != 1:
        raise ValueError(f"span corruption: tokens {tokens.shape} and noise mask "
                         f"{noise_mask.shape} must be equal 1-D shapes")
    starts = _span_starts(noise_mask)
    num_spans = int(starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"span corruption: {num_spans} noise spans but only "
                         f"{len(sentinel_ids)} sentinel ids")
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)[:num_spans]
    # Inputs: keep non-noise tokens, turn each span's first token into its sentinel, drop the
    # rest of the span.
    inputs = tokens.astype(np.int64)
    inputs[starts] = sentinels
    inputs = inputs[~noise_mask | starts]
    # Targets: per span, its sentinel then its tokens. Inserting each sentinel before the
    # span's first token keeps everything in one vectorized pass.
    noise_tokens = tokens[noise_mask]
    noise_starts = np.flatnonzero(starts[noise_mask])
    targets = np.insert(noise_tokens, noise_starts, sentinels)
    eos = np.array([eos_id])
    return (np.concatenate([inputs, eos]).astype(np.int32),
            np.concatenate([targets, eos]).astype(np.int32))


def _pad(values: np.ndarray, length: int, pad_value: float, dtype: type) -> np.ndarray:
    out = np.full(length, pad_value, dtype=dtype)
    out[:len(values)] = values
    return out


def span_corruption_example(tokens: np.ndarray, rng: np.random.Generator, *,
                            noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            sentinel_ids: Sequence[int], eos_id: int, pad_id: int,
                            decoder_start_id: int, inputs_length: int,
                            targets_length: int) -> dict[str, np.ndarray]:
    """One padded encoder-decoder example from L raw tokens.

    tokens: [L] int, normally L = random_spans_helper(inputs_length, ...)[0]; a shorter
    sequence (end of the data) is corrupted as it is and padded.
    -> enc_inputs [S] int32 (corrupted inputs + EOS, pad_id after), enc_segment_ids [S] int32
       (1 real, 0 pad), enc_positions [S] int32 (0.. on real tokens, 0 on pad),
       inputs [T] int32 (decoder inputs: targets shifted right, decoder_start_id first),
       targets [T] int32, loss_weights [T] float32 (1 on real targets incl. the final EOS),
       segment_ids [T] int32, positions [T] int32; S = inputs_length, T = targets_length.
    """
    tokens = np.asarray(tokens)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    enc, dec_targets = corrupt(tokens, mask, sentinel_ids, eos_id)
    if len(enc) > inputs_length or len(dec_targets) > targets_length:
        raise ValueError(f"span corruption of {len(tokens)} tokens gives inputs {len(enc)} / "
                         f"targets {len(dec_targets)} tokens, more than inputs_length "
                         f"{inputs_length} / targets_length {targets_length}")
    dec_inputs = np.concatenate([[decoder_start_id], dec_targets[:-1]])
    n_enc, n_dec = len(enc), len(dec_targets)
    return {
        "enc_inputs": _pad(enc, inputs_length, pad_id, np.int32),
        "enc_segment_ids": _pad(np.ones(n_enc), inputs_length, 0, np.int32),
        "enc_positions": _pad(np.arange(n_enc), inputs_length, 0, np.int32),
        "inputs": _pad(dec_inputs, targets_length, pad_id, np.int32),
        "targets": _pad(dec_targets, targets_length, pad_id, np.int32),
        "loss_weights": _pad(np.ones(n_dec), targets_length, 0, np.float32),
        "segment_ids": _pad(np.ones(n_dec), targets_length, 0, np.int32),
        "positions": _pad(np.arange(n_dec), targets_length, 0, np.int32),
    }


def check_span_config(inputs_length: int, targets_length: int, noise_density: float,
                      mean_noise_span_length: float, n_sentinels: int) -> int:
    """Validate a span-corruption config at config time; -> the raw tokens length L.

    Raises ValueError with a one-line message when the density is not in (0, 1), the mean span
    length is below 1, the sequence is too short to hold a noise span, targets_length is below
    what L raw tokens need, or L raw tokens make more spans than there are sentinels.
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"span corruption: noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError("span corruption: mean_noise_span_length must be >= 1, got "
                         f"{mean_noise_span_length}")
    raw_length, needed_targets = random_spans_helper(inputs_length, noise_density,
                                                     mean_noise_span_length)
    if raw_length < 2 or round(raw_length * noise_density) < 1:
        raise ValueError(f"span corruption: inputs_length {inputs_length} gives {raw_length} raw "
                         f"tokens, too short for a noise span at density {noise_density}")
    num_noise, num_spans = _span_counts(raw_length, noise_density, mean_noise_span_length)
    if raw_length - num_noise < num_spans:
        raise ValueError(f"span corruption: {num_spans} noise spans in {raw_length} raw tokens "
                         f"leave only {raw_length - num_noise} non-noise tokens to separate them")
    if targets_length < needed_targets:
        raise ValueError(f"span corruption: targets_length {targets_length} is below the "
                         f"{needed_targets} targets that {raw_length} raw tokens need")
    if num_spans > n_sentinels:
        raise ValueError(f"span corruption: {raw_length} raw tokens make {num_spans} noise "
                         f"spans but there are only {n_sentinels} sentinel ids")
    return raw_length


def resolve_lengths(inputs_length: int, targets_length: int, noise_density: float,
                    mean_noise_span_length: float, n_sentinels: int) -> tuple[int, int]:
    """(raw tokens length, decoder length) of a config; targets_length 0 means the length
    ``random_spans_helper`` computes (T5's default). ValueError as ``check_span_config``."""
    raw = check_span_config(inputs_length, targets_length or 2**31, noise_density,
                            mean_noise_span_length, n_sentinels)
    needed = random_spans_helper(inputs_length, noise_density, mean_noise_span_length)[1]
    return raw, targets_length or needed


@register
class SpanCorruption(Objective):
    """T5's span corruption on packed documents, for an encoder-decoder: the encoder reads
    ``data.seq_len`` corrupted tokens, the decoder writes the dropped spans."""

    name = "span_corruption"
    arch = "encoder_decoder"
    special_roles = (SENTINELS_ROLE,)

    def _lengths(self, cfg: Config) -> tuple[int, int]:
        """-> (raw tokens per row, decoder length) for ``data.seq_len`` encoder tokens."""
        o = cfg.objective
        return resolve_lengths(cfg.data.seq_len, o.targets_len, o.noise_density,
                               o.mean_span_length, N_SENTINELS)

    def check(self, cfg: Config) -> None:
        self._lengths(cfg)

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        raw_len, targets_len = self._lengths(cfg)
        pipeline = text_pipeline(cfg, tokenizer_path, log, seq_len=raw_len)
        tok, o = pipeline.tokenizer, cfg.objective
        sentinels = role_token_ids(tok, SENTINELS_ROLE, self.name)
        # The tokenizer's own end and padding tokens (a converted T5's </s> and <pad>); the
        # decoder starts from padding unless the model names its own start token.
        special = pipeline.specials
        eos = pipeline.eos_id
        pad = (special.pad_id if special.pad_id is not None
               else token_id(tok, kind_of(tok).pad, self.name))
        start = special.decoder_start_id if special.decoder_start_id is not None else pad

        def corrupt(row: Batch, rng: np.random.Generator) -> Batch:
            return span_corruption_example(
                row["inputs"], rng, noise_density=o.noise_density,
                mean_noise_span_length=o.mean_span_length, sentinel_ids=sentinels,
                eos_id=eos, pad_id=pad, decoder_start_id=start, inputs_length=cfg.data.seq_len,
                targets_length=targets_len)

        return text_task(cfg, pipeline, corrupt)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        return encoder_decoder_logits(model, batch, dropout_rng)
