"""Hugging Face interop: import ``save_pretrained`` directories, export to them."""

from jaxformer.hf.api import PretrainedModel, from_pretrained, pretrained_config, save_pretrained
from jaxformer.hf.checkpoint_io import HFConversionError

__all__ = ["HFConversionError", "PretrainedModel", "from_pretrained", "pretrained_config",
           "save_pretrained"]
