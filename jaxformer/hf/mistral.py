"""Mistral (``MistralForCausalLM``): the Llama layout plus a sliding attention window."""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.hf import llama
from jaxformer.hf.mapping import Rule

MODEL_TYPE = "mistral"
ARCHITECTURE = "MistralForCausalLM"
GENERATES = True  # exports a generation_config.json


def model_config(hf: dict[str, Any]) -> ModelConfig:
    return llama.model_config(hf, family="mistral")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return llama.hf_config(cfg, MODEL_TYPE, ARCHITECTURE)


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    return llama.special_token_ids(eos, pad)


def check_exportable(cfg: ModelConfig) -> None:
    llama.check_exportable(cfg, family="Mistral")


def rules(cfg: ModelConfig) -> list[Rule]:
    return llama.rules(cfg)
