"""The docs and the config comments list exactly the choices the code accepts.

The choice lists come from the code (``jaxformer.config._CHOICES``, with ``objective.kind``
from the objective registry; the attention kernels' backends from
``jaxformer.nn.attention_kernels``), so a choice added, removed or renamed in the code fails
here until every list that enumerates it says the same.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest

import jaxformer.objectives  # noqa: F401 - registers objective.kind's choices
from jaxformer import config as config_lib
from jaxformer.nn import attention_kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CHOICES = config_lib._CHOICES
_PARTS = {f.name: getattr(config_lib.Config(), f.name) for f in dataclasses.fields(
    config_lib.Config) if dataclasses.is_dataclass(getattr(config_lib.Config(), f.name))}
SECTIONS = {type(part).__name__: name for name, part in _PARTS.items()}  # class -> section
FIELD_NAMES = {f.name for part in _PARTS.values() for f in dataclasses.fields(part)}


def _default(key: str) -> object:
    return config_lib.get_key(config_lib.Config(), key)


# --- docs tables ------------------------------------------------------------------------------

def _rows(path: Path) -> list[tuple[list[str], list[str]]]:
    """Every body row of the config-key tables (header ``| key | default | ...``): (its
    first cell's backticked names, the other cells)."""
    rows, in_table = [], False
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["key", "default"]:
            in_table = True
        elif in_table and not re.fullmatch(r"[-: ]+", cells[0]):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1:]))
    return rows


def _named_choices(text: str, key: str) -> set[str]:
    """The backticked identifiers of a table cell, without dotted keys and the config field
    names that are not also ``key``'s choices: what the cell offers as values."""
    return {w for w in re.findall(r"`([a-z0-9_]+)`", text)
            if w in CHOICES[key] or w not in FIELD_NAMES}


def _choice_rows() -> list[tuple[str, str, str, str]]:
    """(doc name, key, default cell, description) of every table row documenting one
    choice-valued key."""
    out = []
    for path in DOCS:
        for names, cells in _rows(path):
            if len(names) == 1 and names[0] in CHOICES and len(cells) >= 2:
                out.append((path.name, names[0], cells[0], " ".join(cells[1:])))
    return out


ROWS = _choice_rows()


@pytest.mark.parametrize("doc, key, default, text", ROWS,
                         ids=[f"{doc}:{key}" for doc, key, _, _ in ROWS])
def test_a_documented_choice_key_lists_exactly_its_choices_and_default(doc, key, default, text):
    assert _named_choices(text, key) == set(CHOICES[key]), (doc, key, text)
    assert default.strip("`").removesuffix(" (default)") == _default(key), (doc, key, default)


def test_every_choice_key_is_documented_with_its_choices():
    assert {key for _, key, _, _ in ROWS} == set(CHOICES)


def _first_column(doc: str, header: str) -> list[str]:
    """The backticked names in the first column of the table whose header row starts with
    ``header`` in docs/``doc``."""
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


@pytest.mark.parametrize("doc, header, key", [
    ("models.md", "| `model.attention` | backends |", "model.attention"),
    ("scaling.md", "| preset | sizes |", "mesh.preset"),
    ("objectives.md", "| schedule | after warmup |", "train.schedule"),
    ("objectives.md", "| `objective.kind` | model |", "objective.kind"),
    ("usage.md", "| kind | what |", "data.tokenizer"),
])
def test_tables_of_choices_have_one_row_per_choice(doc, header, key):
    assert sorted(_first_column(doc, header)) == sorted(CHOICES[key])


# --- the attention kernels: what runs where, and what auto picks ------------------------------

def _kernel_rows() -> dict[str, tuple[str, str]]:
    lines = (ROOT / "docs" / "models.md").read_text().splitlines()
    start = lines.index("| `model.attention` | backends | notes |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, backends, notes = (c.strip() for c in line.strip().strip("|").split("|"))
        rows[name.strip("`")] = (backends, notes)
    return rows


def test_kernel_table_matches_the_code():
    rows = _kernel_rows()
    assert set(rows) == set(CHOICES["model.attention"]) == {"auto",
                                                           *attention_kernels.IMPLEMENTATIONS}
    for name, (backends, _) in rows.items():
        runs_on = set()
        for backend in attention_kernels.BACKEND_IMPLEMENTATIONS:
            try:
                attention_kernels.resolve_implementation(name, backend)
                runs_on.add(backend)
            except ValueError:
                pass
        listed = ({"cpu", "gpu", "tpu"} if backends == "all" else
                  {b.strip().lower() for b in backends.split(",")})
        assert listed == runs_on, (name, backends)
    picks = dict((b.lower(), k) for k, b in re.findall(r"`(\w+)` on (CPU|GPU|TPU)",
                                                       rows["auto"][1]))
    assert picks == attention_kernels.AUTO


# --- the comments in jaxformer/config.py -----------------------------------------------------

def _field_comments() -> dict[str, str]:
    """{key: the comment on a field's line and the comment lines right above it}."""
    source = Path(config_lib.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out, section = {}, None
    for number, line in enumerate(lines, start=1):
        if m := re.match(r"class (\w+)", line):
            section = SECTIONS.get(m.group(1))
        elif section and (m := re.match(r"    (\w+): ", line)):
            above, n = [], number - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            out[f"{section}.{m.group(1)}"] = " ".join(above + [comments.get(number, "")])
    return out


def _enumerated(comment: str) -> set[str] | None:
    """The names of an ``a | b (note) | c`` list in a comment, or None when it has none."""
    m = re.search(r"(?:\w+(?: \([^)]*\))?\s*\|\s*)+\w+", comment)
    if m is None:
        return None
    return {re.sub(r"\([^)]*\)", "", part).strip() for part in m.group(0).split("|")}


COMMENTS = _field_comments()
LISTED = {key: names for key in CHOICES if (names := _enumerated(COMMENTS.get(key, "")))}


def test_the_comment_parser_finds_the_lists():
    assert {"model.attention", "model.pos_encoding", "train.schedule"} <= set(LISTED)
    assert _enumerated("x: auto (per backend) | reference |\n xla") == {"auto", "reference",
                                                                       "xla"}


@pytest.mark.parametrize("key", sorted(LISTED))
def test_config_comments_list_exactly_the_choices(key):
    assert LISTED[key] == set(CHOICES[key]), (key, COMMENTS[key])
