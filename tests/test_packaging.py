"""What pyproject.toml declares is true: the minimum Python is the one CI and the linter use, and the package
imports nothing that minimum lacks."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# standard-library modules newer than Python 3.8, with the release that added them
NEWER_STDLIB = {"tomllib": (3, 11), "importlib.resources.abc": (3, 11), "zoneinfo": (3, 9), "graphlib": (3, 9)}


def declared_minimum() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match, f"requires-python should be a plain lower bound, got {spec!r}"
    return 3, int(match.group(1))


def imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "surgeon").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
    return found


def test_the_package_imports_only_what_the_declared_minimum_has():
    minimum = declared_minimum()
    too_new = {name: version for name, version in NEWER_STDLIB.items()
               if name in imported_modules() and version > minimum}
    assert not too_new, f"requires-python allows {minimum} but surgeon imports {too_new}"


def test_ci_and_the_linter_use_the_declared_minimum():
    minimum = declared_minimum()
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    assert ruff == f"py{minimum[0]}{minimum[1]}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'PYTHON="${{PYTHON:-python{minimum[0]}.{minimum[1]}}}"' in ci
    assert sys.version_info[:2] >= minimum
