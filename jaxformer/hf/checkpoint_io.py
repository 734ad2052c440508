"""Reading and writing Hugging Face model directories (``config.json`` + safetensors).

Only safetensors are read: they are plain arrays, so no PyTorch is needed. A directory with
only ``pytorch_model.bin`` is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxformer.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFConversionError(UserError):
    """A Hugging Face directory or model that cannot be converted (one-line message)."""


def read_hf_config(directory: Path | str) -> dict:
    """config.json of a ``save_pretrained`` directory, as a dict."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HFConversionError(f"{directory} has no config.json (not a save_pretrained directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise HFConversionError(f"{config_path} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise HFConversionError(f"{config_path} holds a JSON {type(config).__name__}, not the "
                                "object of a transformers config")
    return config


def _one_line(error: BaseException, limit: int = 200) -> str:
    return " ".join(str(error).split())[:limit]


def read_hf_dir(directory: Path | str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (config.json as a dict, {tensor name: array}) of a ``save_pretrained`` directory."""
    directory = Path(directory)
    config = read_hf_config(directory)
    if (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    elif (directory / INDEX_FILE).is_file():
        try:
            index = json.loads((directory / INDEX_FILE).read_text())
            files = [directory / name for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise HFConversionError(f"{directory / INDEX_FILE} is not a safetensors index "
                                    f"(JSON with a weight_map): {_one_line(e)}") from None
    elif (directory / "pytorch_model.bin").is_file():
        raise HFConversionError(
            f"{directory} holds pytorch_model.bin only; save it again with "
            "save_pretrained(..., safe_serialization=True) to get safetensors")
    else:
        raise HFConversionError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.is_file():
            raise HFConversionError(f"{f} is missing (named by {INDEX_FILE})")
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header
            raise HFConversionError(f"{f} is not a readable safetensors file: "
                                    f"{_one_line(e)}") from None
    return config, tensors


def write_hf_dir(directory: Path | str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``config.json`` and one ``model.safetensors`` (float32, contiguous)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    save_file(arrays, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
