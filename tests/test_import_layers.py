"""The package's layers: the core, the generative maths and the callbacks never import the
shell (``nnh.handler``) at run time; only type-checking imports may name it.

A run-time import of the handler from these packages is an import circle
(``nnh.handler`` imports them), and couples the pure layers to the stateful one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nnh"
LOWER_LAYERS = ("core", "generative", "callbacks")


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import outside an ``if TYPE_CHECKING:`` block."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                skipped.add(id(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


FILES = sorted(p for layer in LOWER_LAYERS for p in (SRC / layer).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_lower_layers_do_not_import_the_shell_at_run_time(path):
    bad = [(line, mod) for line, mod in runtime_imports(path) if mod.startswith("nnh.handler")]
    assert not bad, f"{path.relative_to(SRC)} imports the shell at run time: {bad}"


def test_the_checker_sees_a_runtime_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from nnh.handler import NNHandler\n"
        "def f():\n    from nnh.handler.saving import write_checkpoint\n"
    )
    assert runtime_imports(sample) == [(1, "typing"), (5, "nnh.handler.saving")]
