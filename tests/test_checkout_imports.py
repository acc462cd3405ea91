"""A checkout on ``sys.path`` (``python -m`` or ``python -c`` from the repository root, and pytest itself) must not
shadow an installed distribution with one of its top-level data folders: transformers imports the ``kernels``
distribution, and the repository's ``kernels/`` holds the CUDA sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, sys
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec is not None else "")
import transformers.integrations.hub_kernels  # imports the kernels distribution where it is installed
print("ok")
"""


def test_the_kernels_folder_does_not_shadow_the_kernels_distribution():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
    origin, ok = result.stdout.split()
    assert ok == "ok"
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert Path(origin).resolve().parent != (ROOT / "kernels").resolve()  # the distribution, not the folder
