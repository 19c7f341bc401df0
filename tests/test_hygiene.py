"""Source checks ruff does not make: no statement after a return, raise, break or continue in the same block
(an edit that replaces a function's body but leaves the old one below its new return)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("src/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")])
ENDS_A_BLOCK = (ast.Return, ast.Raise, ast.Break, ast.Continue)


def unreachable_statements(tree: ast.AST) -> list[int]:
    """Line numbers of statements that follow a return/raise/break/continue in the same block."""
    lines = []
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for before, after in zip(block, block[1:], strict=False):
                if isinstance(before, ENDS_A_BLOCK):
                    lines.append(after.lineno)
    return lines


def test_the_check_finds_a_statement_after_a_return():
    assert unreachable_statements(ast.parse("def f():\n    return 1\n    x = 2\n")) == [3]
    assert unreachable_statements(ast.parse("def f(a):\n    if a:\n        return 1\n    return 2\n")) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unreachable_statements(path):
    assert unreachable_statements(ast.parse(path.read_text(), str(path))) == [], path
