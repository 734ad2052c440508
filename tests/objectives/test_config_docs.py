"""docs/objectives.md documents every ``objective.*`` key with its real default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from jaxformer.config import ObjectiveConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "objectives.md"


def _doc_text(value: object) -> str:
    """A default as the table writes it: `false`, `causal`, 0.15, 0."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_objective_key_is_in_the_table_with_its_default():
    rows = re.findall(r"^\| `objective\.(\w+)` \| ([^|]+) \|", DOC.read_text(), re.MULTILINE)
    documented = {name: default.strip().strip("`") for name, default in rows}
    defaults = {f.name: _doc_text(f.default) for f in dataclasses.fields(ObjectiveConfig)}
    assert documented == defaults
