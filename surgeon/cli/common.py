"""What every command shares: the consoles, one-line errors (exit code 2), progress, the common options, and
loading a MODEL argument.

Errors are one line on stderr with exit code 2 (``SURGEON_DEBUG=1`` re-raises for a traceback); progress is
shown only when stderr is a terminal; ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from surgeon.errors import SurgeonError

stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    stderr.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(2)


def friendly_errors(command: F) -> F:
    """One-line errors and exit code 2 instead of tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except SurgeonError as exc:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted") from None
        except Exception as exc:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise fail(f"{type(exc).__name__}: {first} (set SURGEON_DEBUG=1 for the traceback)") from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress(message: str) -> Iterator[None]:
    if sys.stderr.isatty():
        with stderr.status(message):
            yield
    else:
        yield


ModelArg = Annotated[str, typer.Argument(help="timm name, hf-hub:org/name, local-dir:PATH, a directory, or a "
                                              "weights file (with --arch).")]
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name or a TOML file.")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Weights file for a timm architecture.")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="timm architecture of a weights file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
NonStrictOpt = Annotated[bool, typer.Option("--non-strict", help="Allow missing/unexpected checkpoint keys.")]


def load_model_argument(model: str, weights: Path | None, arch: str | None, pretrained: bool, non_strict: bool) -> Any:
    from surgeon.io.artifacts import load_model

    with progress(f"loading {model}"):
        return load_model(model, weights=str(weights) if weights else None, arch=arch, pretrained=pretrained,
                          strict=not non_strict)
