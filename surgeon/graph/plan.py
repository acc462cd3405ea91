"""The plan: every site of a model, what a recipe does there, and what it costs.

Printable (a rich table rendered to text) and serialisable (``to_json``, schema ``surgeon.plan/1``).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgeon.methods.base import Site
from surgeon.recipe import Recipe

if TYPE_CHECKING:
    from rich.table import Table

PLAN_SCHEMA = "surgeon.plan/1"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass
class Plan:
    model: str
    recipe: Recipe
    sites: list[Site]
    input_shape: tuple[int, ...] | None
    warnings: list[str] = field(default_factory=list)

    def by_action(self, action: str) -> list[Site]:
        return [s for s in self.sites if s.action == action]

    @property
    def swapped(self) -> list[Site]:
        return self.by_action("swap")

    @property
    def unreachable(self) -> list[Site]:
        return self.by_action("unreachable")

    def summary(self) -> dict[str, Any]:
        swapped = self.swapped
        return {
            "sites": len(self.sites),
            "actions": dict(Counter(s.action for s in self.sites)),
            "swapped_by_op": dict(Counter(s.op for s in swapped)),
            "swapped_by_target": dict(Counter(s.target for s in swapped)),
            "added_params": sum(s.added_params for s in swapped),
            "added_macs": sum(s.added_macs for s in swapped),
            "saved_bytes_before": sum(s.saved_bytes_before for s in swapped),
            "saved_bytes_after": sum(s.saved_bytes_after for s in swapped),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "recipe": self.recipe.to_dict(),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "summary": self.summary(),
            "warnings": self.warnings,
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> Table:
        from rich.table import Table

        shape_note = f" (estimates for input {tuple(self.input_shape)})" if self.input_shape else ""
        table = Table(title=f"surgeon plan: {self.model} with recipe '{self.recipe.name}'{shape_note}")
        table.add_column("site", no_wrap=True)
        for column in ("target", "access", "op", "shape", "action", "+params", "+MFLOPs", "saved before→after"):
            table.add_column(column, no_wrap=True)
        table.add_column("note", overflow="fold")
        for s in self.sites:
            shape = "×".join(str(d) for d in s.input_shape[1:]) if s.input_shape else "?"
            saved = f"{human_bytes(s.saved_bytes_before)}→{human_bytes(s.saved_bytes_after)}" if s.action == "swap" \
                and s.saved_bytes_before else ""
            note = s.reason or (f"shared by {len(s.aliases)} paths" if len(s.aliases) > 1 and s.owner is None else "")
            if s.calls > 1 and s.owner is None:
                note = f"{note}; called {s.calls}×".lstrip("; ")
            table.add_row(s.path or "<root>", s.target, s.access, s.op, shape, s.action,
                          str(s.added_params) if s.added_params else "",
                          f"{2 * s.added_macs / 1e6:.2f}" if s.added_macs else "", saved, note)
        return table

    def summary_line(self) -> str:
        summary = self.summary()
        actions = ", ".join(f"{n} {a}" for a, n in sorted(summary["actions"].items()))
        return (f"{len(self.sites)} sites ({actions}); +{summary['added_params']:,} params, "
                f"+{2 * summary['added_macs'] / 1e6:.1f} MFLOPs; saved-for-backward at swapped sites "
                f"{human_bytes(summary['saved_bytes_before'])} → {human_bytes(summary['saved_bytes_after'])}")

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=160, force_terminal=False, color_system=None)
        console.print(self.table())
        console.print(self.summary_line())
        for warning in self.warnings:
            console.print(f"warning: {warning}")
        return buffer.getvalue()
