"""Shared fixtures. Tests run on the CPU; sharding tests start their own processes with fake
devices (XLA_FLAGS must be set before jax is imported)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# LLVM's optimization level for the CPU code XLA emits, for this process and the `jaxformer`
# processes the tests start (they inherit the environment); XLA's HLO passes are unchanged.
# The tests check what programs compute, not how fast their machine code runs: unoptimized code
# compiles faster and a tiny model's steps run slower, a net 29% off tests/models + tests/nn
# (638 s -> 455 s on 2 cores). Processes a test compares with each other get the same flags.
from tests.parallel.fake_devices import FAST_COMPILE  # noqa: E402

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

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


# The files that take longest on 2 cores (seconds summed from `--durations`, 2026-12-03), run
# first. pytest-xdist's --dist loadfile hands each worker whole files from a queue, by default
# ordered by test count (pyproject.toml turns that off with --no-loadscope-reorder), which put
# one-test files of a minute or more last, with the other worker idle; longest first, the
# workers finish within about one small file of each other.
LONGEST_FIRST = (
    "tests/test_experiments.py",
    "tests/objectives/test_transcription.py",
    "tests/objectives/test_captioning.py",
    "tests/objectives/test_recipes.py",
    "tests/test_cli.py",
    "tests/hf/test_convert_cli.py",
    "tests/aot/test_compile.py",
    "tests/parallel/test_modalities_sharding.py",
    "tests/parallel/test_multiprocess.py",
    "tests/parallel/test_presets.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # sorted() is stable: every other file keeps its collection order, after these.
    items[:] = sorted(items, key=lambda item: rank.get(item.nodeid.split("::")[0],
                                                       len(LONGEST_FIRST)))
