"""The package's layering: no import cycles (function-level imports included), each layer imports only layers
below it, ``ops`` imports nothing else from surgeon, and ``import surgeon`` loads no heavy dependency."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import surgeon

PACKAGE = Path(surgeon.__file__).resolve().parent

# lowest first; a module may import its own layer and those before it
LAYERS = [
    ("surgeon.version", "surgeon.errors", "surgeon.ops"),
    ("surgeon.methods",),
    ("surgeon.recipe",),
    ("surgeon.graph",),
    ("surgeon.api",),
    ("surgeon.io",),
    ("surgeon.train",),
    ("surgeon.cli", "surgeon.__main__"),
    ("surgeon",),  # the package itself: the public API, which nothing inside the package imports
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_imports(path: Path, known: set[str]) -> set[str]:
    """surgeon modules a file imports anywhere (module level or inside functions), ``if TYPE_CHECKING:`` aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking = {id(node) for block in ast.walk(tree)
                     if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                     for statement in block.body for node in ast.walk(statement)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from surgeon.ops import bitpack`` imports the submodule surgeon.ops.bitpack
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "surgeon" or name.startswith("surgeon."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {target for target in _runtime_imports(path, known) if target != name}
            for name, path in modules.items()}


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_cycle_check_catches_a_function_level_cycle(tmp_path):
    """The check above reads imports inside functions too (where cycles used to hide)."""
    (tmp_path / "a.py").write_text("def f():\n    from surgeon.b import g\n")
    (tmp_path / "b.py").write_text("from surgeon.a import f\n")
    known = {"surgeon.a", "surgeon.b"}
    graph = {"surgeon.a": _runtime_imports(tmp_path / "a.py", known),
             "surgeon.b": _runtime_imports(tmp_path / "b.py", known)}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_layers_import_downward_only():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in _graph().items() for target in sorted(targets) if _layer(target) > _layer(module)]
    assert upward == []


def test_ops_imports_nothing_else_from_surgeon():
    outside = [f"{module} imports {target}" for module, targets in _graph().items() if module.startswith("surgeon.ops")
               for target in targets if not target.startswith("surgeon.ops")]
    assert outside == []


def test_import_surgeon_is_light():
    code = ("import sys, surgeon\n"
            "heavy = [m for m in ('timm', 'rich', 'huggingface_hub', 'typer', 'safetensors') if m in sys.modules]\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_every_public_name_resolves():
    for name in surgeon.__all__:
        assert getattr(surgeon, name) is not None, name
    assert set(surgeon.__all__) <= set(dir(surgeon))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        surgeon.not_a_name  # noqa: B018
