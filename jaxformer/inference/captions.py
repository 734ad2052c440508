"""Captioning images with an image-prefix run (``model.arch='image_prefix'``): greedy or beam
decoding through the common generation API (``Generator``, ``beam_search`` with the
``ImagePrefixFamily``) and the held-out exact match (the ``caption_exact_match`` decode
metric)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxformer.config import Config
from jaxformer.data import captions
from jaxformer.inference.beam_search import best_sequences
from jaxformer.inference.families import Family, family_for
from jaxformer.inference.generate import Generator
from jaxformer.objectives.base import Task


def caption_family(cfg: Config, graphdef: Any) -> Family:
    return family_for(cfg, graphdef, decoder_start_id=captions.BOS_ID)


def describe(family: Family, params: Any, images: Sequence[np.ndarray], *, num_beams: int = 1,
             generator: Generator | None = None) -> list[str]:
    """Images [S, S, C] float -> their captions: greedy (``num_beams`` 1) or the best beam.
    ``generator``: a greedy ``Generator`` of ``family`` to reuse across calls."""
    rows = best_sequences(family, params, images, captions.max_caption_tokens(),
                          eos_id=captions.EOS_ID, pad_id=captions.PAD_ID, num_beams=num_beams,
                          generator=generator)
    return [captions.decode_caption(r) for r in rows]


def heldout_captions(cfg: Config, graphdef: Any, params: Any, data: captions.CaptionTask,
                     n_images: int, num_beams: int = 1) -> tuple[list[str], list[str]]:
    """-> (the model's captions, the references) of the first ``n_images`` held-out images."""
    family = caption_family(cfg, graphdef)
    generator = Generator(family, params, pad_id=captions.PAD_ID) if num_beams == 1 else None
    hyps: list[str] = []
    refs: list[str] = []
    batch = cfg.train.batch_size
    for start in range(0, n_images, batch):
        rows = [data.heldout(k) for k in range(start, min(start + batch, n_images))]
        hyps += describe(family, params, [x for x, _ in rows], num_beams=num_beams,
                         generator=generator)
        refs += [t for _, t in rows]
    return hyps, refs


def caption_exact_match(cfg: Config, graphdef: Any, params: Any, task: Task) -> float:
    """The ``caption_exact_match`` decode metric: the share of held-out images whose greedy
    caption equals the reference (``eval.batches`` batches; 0: ``captions.HELDOUT_IMAGES``)."""
    data = task.captions
    assert data is not None, "caption exact match decodes a caption task"
    n = (cfg.eval.batches * cfg.train.batch_size if cfg.eval.batches
         else captions.HELDOUT_IMAGES)
    hyps, refs = heldout_captions(cfg, graphdef, params, data, n)
    return float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)]))
