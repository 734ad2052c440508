"""Imports go down only (docs/architecture.md "Layers"): a module may import its own layer
and the layers below it, never one above; and the package's own modules are imported at the
top of a module, not inside functions to dodge a cycle (the command front ends excepted: they
import lazily so that ``jaxformer --help`` does not load JAX)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxformer"

# Lowest first. Same number: the same layer (they may import each other).
LAYERS = {
    "errors": 0, "config": 0, "malloc_tuning": 0,
    "parallel": 1,
    "nn": 2,
    "models": 3,
    "data": 4,
    "objectives": 5,
    "runs": 6,
    "inference": 7, "hf": 7,
    "train": 8,
    "analysis": 9, "sweep": 9, "aot": 9,
    "cli": 10,
}
LAZY_IMPORTS_ALLOWED = {"cli", "sweep.commands"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top not in LAYERS:
        pytest.fail(f"jaxformer.{top} has no layer in tests/test_layers.py LAYERS (and in "
                    "docs/architecture.md): place it")
    return LAYERS[top]


def _package_imports(tree: ast.AST) -> list[tuple[ast.stmt, str, bool]]:
    """-> [(node, imported jaxformer module without the prefix, inside a function)]."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("jaxformer."):
                        found.append((child, alias.name[len("jaxformer."):], in_function))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "jaxformer":
                    found.extend((child, alias.name, in_function) for alias in child.names)
                elif child.module.startswith("jaxformer."):
                    found.append((child, child.module[len("jaxformer."):], in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _violations() -> tuple[list[str], list[str]]:
    upward, lazy = [], []
    for path in _modules():
        name = _name(path)
        if not name:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node, target, in_function in _package_imports(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if _layer(target) > _layer(name):
                upward.append(f"{where}: jaxformer.{name} (layer {_layer(name)}) imports "
                              f"jaxformer.{target} (layer {_layer(target)})")
            if in_function and name not in LAZY_IMPORTS_ALLOWED:
                lazy.append(f"{where}: jaxformer.{target} imported inside a function")
    return upward, lazy


def test_every_module_has_a_layer():
    for path in _modules():
        if _name(path):
            _layer(_name(path))


def test_imports_only_go_down():
    upward, _ = _violations()
    assert not upward, "\n".join(upward)


def test_no_function_level_imports_of_the_package():
    _, lazy = _violations()
    assert not lazy, "\n".join(lazy)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker finds imports in every form, at module level and inside functions."""
    tree = ast.parse("import jaxformer.train.loop\nfrom jaxformer import cli\n"
                     "def f():\n    from jaxformer.hf.api import x\n")
    found = [(target, lazy) for _, target, lazy in _package_imports(tree)]
    assert found == [("train.loop", False), ("cli", False), ("hf.api", True)]
    assert _layer("cli") > _layer("train.loop") > _layer("hf.api") > _layer("config")
