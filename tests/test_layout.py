"""The layers stay apart: common/ is shared by both sides, and the `privet` command (privet/) is the only place
that reaches into both client/ and server/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package: the top-level packages it must never import (at module level or inside a function)
FORBIDDEN = {"common": {"client", "server", "privet"}, "server": {"client", "privet"}, "client": {"server", "privet"}}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_the_layers_it_must_not_depend_on(package):
    offending = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert {path: names for path, names in offending.items() if names} == {}
