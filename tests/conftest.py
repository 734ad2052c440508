"""Shared fixtures. Tests run on the CPU; sharding tests start their own processes with fake
devices (XLA_FLAGS must be set before jax is imported)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Configs validate objective.kind against the registered objectives (jaxformer.config).
import jaxformer.objectives  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token, tokenizer and datasets caches go to a per-session temp dir, never the user's
    home. Session-scoped so module-scoped fixtures (and the CLI processes they start, which
    inherit the environment) see it too."""
    base = tmp_path_factory.getbasetemp()
    saved = {k: os.environ.get(k) for k in ("JAXFORMER_CACHE", "HF_DATASETS_CACHE")}
    os.environ["JAXFORMER_CACHE"] = str(base / "jaxformer-cache")
    os.environ["HF_DATASETS_CACHE"] = str(base / "hf-datasets")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
