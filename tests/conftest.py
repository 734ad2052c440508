"""Shared fixtures. Tests run on the CPU; sharding tests start their own processes with fake
devices (XLA_FLAGS must be set before jax is imported)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token and tokenizer caches go to a per-session temp dir, never the user's home."""
    cache = tmp_path_factory.getbasetemp() / "jaxformer-cache"
    monkeypatch.setenv("JAXFORMER_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
