"""Whether a directory is surgeon's to replace: empty, or an artifact holding only files surgeon writes.

``--force`` replaces an output directory as a whole, so it must never reach a directory a user keeps other things
in: a config with a ``surgeon`` section is not enough, every entry must be one surgeon wrote (the artifact files,
and exports its config records). Anything else is named in the refusal, and nothing is touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from surgeon.io.names import ADAPTER_CONFIG_NAME, ARTIFACT_FILES, CONFIG_NAME

# ``.NAME.tmp-PID-XXXX`` files left by a writer that died while replacing one of its own files
_STAGING = re.compile(r"\.(?P<name>[^/]+?)\.tmp-\d+-[^/]*")
Ownership = Callable[[Path], str | None]  # directory -> a description of an entry surgeon did not write, or None


def _recorded_exports(directory: Path) -> set[str] | None:
    """Export file names the artifact's config records, or None if ``directory`` holds no surgeon config."""
    for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME):
        path = directory / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size < (32 << 20) else None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return None
        section = config.get("surgeon") if isinstance(config, dict) else None
        if not isinstance(section, dict) or section.get("format") not in ("converted", "merged", "adapter"):
            return None
        exports = section.get("exports") if isinstance(section.get("exports"), list) else []
        return {e["file"] for e in exports if isinstance(e, dict) and isinstance(e.get("file"), str)}
    return None


def foreign_artifact_entry(directory: Path) -> str | None:
    """``None`` if ``directory`` is empty or a surgeon artifact made only of files surgeon writes; otherwise what
    is in the way (the first foreign entry, or that no surgeon config is there)."""
    entries = sorted(directory.iterdir())
    if not entries:
        return None
    exports = _recorded_exports(directory)
    if exports is None:
        return f"it holds no surgeon config ({entries[0].name} among others)"
    for entry in entries:
        staging = _STAGING.fullmatch(entry.name)
        name = staging.group("name") if staging else entry.name
        if entry.is_symlink() or not entry.is_file():
            return f"{entry.name} is not a file surgeon wrote"
        if name not in ARTIFACT_FILES and name not in exports:
            return f"{entry.name} is not a file surgeon wrote"
    return None


def require_replaceable(destination: Path, force: bool, owned: Ownership = foreign_artifact_entry) -> None:
    """Raise unless writing ``destination`` may go ahead: it does not exist, or ``force`` is set and ``owned``
    finds nothing in it that surgeon did not write."""
    from surgeon.errors import SurgeonError

    if not destination.exists():
        return
    if not destination.is_dir():
        raise SurgeonError(f"{destination} exists and is not a directory")
    if not force:
        raise SurgeonError(f"{destination} already exists (use --force / force=True to replace it)")
    problem = owned(destination)
    if problem is not None:
        raise SurgeonError(f"refusing to replace {destination}: {problem}; --force only replaces an empty "
                           "directory or a surgeon artifact")
