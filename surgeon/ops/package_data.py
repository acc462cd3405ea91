"""Where the package's data folders (``recipes``, ``kernels``) are.

Installed, they are the folders ``surgeon/recipes`` and ``surgeon/kernels``; in a source checkout imported without
installing (``python -m`` from the repository root) or installed in editable mode, the top-level folders.
``kernels/`` has no ``__init__.py``: with the repository root on ``sys.path`` a regular package there would shadow
the ``kernels`` distribution that transformers imports, while a folder without one yields to it.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def data_dir(name: str) -> Traversable:
    """The data folder ``name``: inside the installed package where it is there, else the checkout's own."""
    installed = resources.files("surgeon").joinpath(name)
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / name
