"""Crash-safe writes: build an artifact beside its destination, then rename it into place.

A reader therefore sees either the previous complete artifact or the new complete one, never a partial file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError


@contextmanager
def staged_directory(destination: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``destination``; on success it replaces ``destination``."""
    destination = Path(destination)
    if destination.exists() and not force:
        raise SurgeonError(f"{destination} already exists (use --force / force=True to replace it)")
    if destination.exists() and not destination.is_dir():
        raise SurgeonError(f"{destination} exists and is not a directory")
    parent = destination.parent if str(destination.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=parent))
    except OSError as exc:
        raise SurgeonError(f"cannot write into {parent}: {exc.strerror}") from exc
    try:
        yield staging
        for entry in staging.iterdir():
            if entry.is_file():
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

