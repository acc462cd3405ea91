"""Recipe options of the linear delta method."""

from __future__ import annotations

from typing import Any

from surgeon.methods.base import Check, positive_int

OPTIONS: dict[str, tuple[Any, Check]] = {
    "min_kernel": (2, positive_int),
}
