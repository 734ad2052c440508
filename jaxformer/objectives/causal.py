"""Causal language modelling (GPT): predict every next token of packed documents."""

from __future__ import annotations

from pathlib import Path

from jaxformer.config import Config
from jaxformer.objectives.base import Log, Objective, Task
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import text_pipeline, text_task


@register
class CausalLM(Objective):
    name = "causal"
    arch = "decoder"
    sampling = "continuation"

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        return text_task(cfg, text_pipeline(cfg, tokenizer_path, log), None)
