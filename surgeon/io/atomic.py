"""Crash-safe writes: build an artifact beside its destination, then rename it into place.

A reader therefore sees either the previous complete artifact or the new complete one, never a partial file, and
a writer killed at any point leaves the previous artifact in place.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.io.ownership import Ownership, foreign_artifact_entry, require_replaceable


def _load_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / old glibc: the two-rename fallback is used
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without the flag
        return False
    raise OSError(error, os.strerror(error), str(first))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(destination: Path) -> None:
    """Delete staging directories of ``destination`` left by writers that died (SIGKILL, power loss)."""
    parent = destination.parent if str(destination.parent) else Path(".")
    for entry in parent.glob(f".{glob.escape(destination.name)}.tmp-*"):
        match = re.fullmatch(rf"\.{re.escape(destination.name)}\.tmp-(\d+)-.*", entry.name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give a staged directory and its files the modes a plain ``mkdir``/``open`` would have (``mkdtemp`` makes
    them private), as ``save_pretrained`` leaves them."""
    mask = current_umask()
    for entry in directory.rglob("*"):
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)
    directory.chmod(0o777 & ~mask)


def output_directory(destination: str | Path) -> Path:
    """Where an output directory is really written: a symlinked destination is followed (its target is replaced
    and the link kept), and the working directory or one above it is refused."""
    destination = Path(destination)
    if destination.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(destination.resolve()):
        raise SurgeonError(f"cannot write an artifact to {str(destination)!r}: it is the working directory or "
                           "one above it; name a new directory")
    return destination.resolve() if destination.is_symlink() else destination


@contextmanager
def staged_directory(destination: str | Path, force: bool = False,
                     owned: Ownership = foreign_artifact_entry) -> Iterator[Path]:
    """Yield a temporary directory next to ``destination``; on success it replaces ``destination``.

    An existing ``destination`` is replaced only with ``force`` and only if ``owned`` finds nothing in it that
    surgeon did not write (by default: an empty directory or a surgeon artifact). The replacement is one atomic
    exchange where the OS has it, so ``destination`` is never missing, not even for an instant; staging
    directories carry the writer's PID and the next save removes those of dead writers.
    """
    destination = output_directory(destination)
    require_replaceable(destination, force, owned)
    parent = destination.parent if str(destination.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(destination)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise SurgeonError(f"cannot write into {parent}: {exc.strerror}") from exc
    try:
        yield staging
        follow_umask(staging)
        for entry in staging.iterdir():
            if entry.is_file():
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())
        if destination.exists():
            require_replaceable(destination, force, owned)  # it may have changed while this one was written
        if destination.exists() and _exchange(staging, destination):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous artifact
        elif destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-{os.getpid()}-", dir=parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
