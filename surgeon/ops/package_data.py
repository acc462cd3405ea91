"""Where the package's data folders (``recipes``, ``kernels``) are.

Installed, they are the subpackages ``surgeon.recipes`` / ``surgeon.kernels``; in a source checkout
imported without installing (``python -m`` from the repository root), they are the top-level folders.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def data_dir(name: str) -> Traversable:
    try:
        return resources.files(f"surgeon.{name}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / name
