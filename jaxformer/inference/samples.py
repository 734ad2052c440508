"""End-of-run samples of a language model: continuations of prompts, decoded with a KV cache.

Without configured prompts (``sample.prompts`` empty, the default) the prompts are the first
line of ``sample.count`` held-out documents, so samples fit whatever corpus the run trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.config import Config
from jaxformer.data.pipeline import DataPipeline
from jaxformer.inference.sampling import Generator, SamplingParams
from jaxformer.objectives.base import Task

PROMPT_TOKENS = 12  # the most tokens of a held-out document's start taken as its prompt


def heldout_prompts(data: DataPipeline, count: int) -> list[str]:
    """The start of the first ``count`` held-out documents that have text: each document's
    first line (newline included), at most ``PROMPT_TOKENS`` tokens of it."""
    rows = data.val_rows if data.val_rows is not None else data.train_rows
    tokens, doc_ids = rows.stream.tokens, rows.stream.doc_ids
    starts = np.flatnonzero(np.diff(doc_ids, prepend=-1) != 0)  # each document's first token
    prompts: list[str] = []
    if count <= 0:
        return prompts
    ends = np.append(starts[1:], len(tokens))
    for start, end in zip(starts, ends, strict=True):
        ids = [int(t) for t in tokens[start:min(end, start + PROMPT_TOKENS)] if t != data.eos_id]
        text = data.decode(ids)
        body = text.lstrip("\n")
        if "\n" in body:  # through the end of the first line that has text
            text = text[:len(text) - len(body) + body.index("\n") + 1]
        if text.strip():
            prompts.append(text)
        if len(prompts) == count:
            break
    return prompts


def prompt_ids(data: DataPipeline, prompt: str) -> tuple[str, list[int]]:
    """-> (the prompt as decoded, its token ids). Trailing spaces are dropped: byte-level BPE
    puts a word's leading space into the word's token, so a prompt that ends in a lone space
    token makes the model start its continuation with a second space."""
    prompt = prompt.rstrip(" ") or prompt
    return prompt, [int(t) for t in data.encode(prompt)]


def continuation_samples(cfg: Config, graphdef: Any, params: Any, task: Task
                         ) -> list[tuple[str, str]]:
    """-> [(prompt, continuation)] for ``sample.prompts`` (or held-out document starts)."""
    data = task.pipeline
    if data is None:
        return []
    s = cfg.sample
    prompts = list(s.prompts) or heldout_prompts(data, s.count)
    generator = Generator(graphdef, params, cfg.model.max_len)
    sampling = SamplingParams(s.temperature, s.top_k, s.top_p)
    out = []
    for i, prompt in enumerate(prompts):
        prompt, ids = prompt_ids(data, prompt)
        ids = ids[-(cfg.model.max_len - 1):]  # room for one new token at least
        budget = min(s.max_new_tokens, cfg.model.max_len - len(ids))  # within the KV cache
        new = generator.generate(ids, budget, sampling, seed=i, stop_token=data.eos_id)
        out.append((prompt, data.decode([t for t in new if t != data.eos_id])))
    return out
