"""User-facing errors.

Everything the user can get wrong (a bad recipe, a missing file, a checkpoint that does not fit) raises
:class:`SurgeonError` with a one-line message; the CLI prints it and exits with code 2.
"""

from __future__ import annotations


def first_line(text: object, limit: int = 300) -> str:
    """The first line of an inner error's message, whole; one longer than ``limit`` is cut at a word boundary
    (never mid-word) and marked with an ellipsis."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if cut else line[:limit]) + " …"


class SurgeonError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2


class RecipeError(SurgeonError):
    """A recipe field is unknown or has a bad value; the message names the field."""


class CheckpointError(SurgeonError):
    """A checkpoint could not be read or does not fit the architecture; the message names the file."""


class SurgeonWarning(UserWarning):
    """Something the user most likely did not intend, though the result is valid (e.g. nothing to train)."""
