"""End-of-run samples of a language model: continuations of prompts, decoded with a KV cache.

Without configured prompts (``sample.prompts`` empty, the default) the prompts are the first
line of ``sample.count`` held-out documents, so samples fit whatever corpus the run trained on.
The special tokens are the run's (``DataPipeline.specials``: a converted model's own begin and
end tokens, or jaxformer's EOS): a prompt starts with the begin token when the model's
tokenizer puts one before text, and a sample ends at the first end token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.config import Config
from jaxformer.data.pipeline import DataPipeline
from jaxformer.inference.families import family_for
from jaxformer.inference.generate import Generator
from jaxformer.inference.processors import SamplingParams
from jaxformer.objectives.base import Task
from jaxformer.runs.specials import until_eos

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
    special = data.specials.ids()  # the document's end and, for some models, begin token
    for start, end in zip(starts, ends, strict=True):
        ids = [int(t) for t in tokens[start:min(end, start + PROMPT_TOKENS)] if t not in special]
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
    """-> (the prompt as decoded, its token ids: after the begin token when the model's
    tokenizer puts one first, as training documents have it). Trailing spaces are dropped:
    byte-level BPE puts a word's leading space into the word's token, so a prompt that ends in
    a lone space token makes the model start its continuation with a second space."""
    prompt = prompt.rstrip(" ") or prompt
    ids = [int(t) for t in data.encode(prompt)]
    if data.specials.add_bos:
        ids = [data.specials.bos_id, *ids]
    return prompt, ids


def continuation_samples(cfg: Config, graphdef: Any, params: Any, task: Task
                         ) -> list[tuple[str, str]]:
    """-> [(prompt, continuation)] for ``sample.prompts`` (or held-out document starts)."""
    data = task.pipeline
    if data is None:
        return []
    s = cfg.sample
    prompts = list(s.prompts) or heldout_prompts(data, s.count)
    family = family_for(cfg, graphdef)
    generator = Generator(family, params, pad_id=data.eos_id, decode=data.decode)
    sampling = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    pairs = [prompt_ids(data, prompt) for prompt in prompts]
    # Long prompts keep their end, with room for one new token at least.
    ids = [p[1][-(cfg.model.max_len - 1):] for p in pairs]
    if not ids:
        return []
    budget = min(s.max_new_tokens, cfg.model.max_len - max(map(len, ids)))  # within the cache
    # One batch; generation stops at the run's end tokens (a converted model may have several).
    gens = generator.generate(ids, budget, sampling, seed=0,
                              stop_tokens=list(data.specials.eos_ids))
    out = [(prompt, data.decode(until_eos(g.tokens, data.specials)))
           for (prompt, _), g in zip(pairs, gens, strict=True)]
    return out
