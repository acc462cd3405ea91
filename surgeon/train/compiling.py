"""``torch.compile`` support: which backends exist, and where dynamo breaks a model's graph.

surgeon's custom autograd functions are written so dynamo traces them whole (no data-dependent branches, no data
pointers, no state changed inside a forward), so a converted model in training mode compiles to one graph. This
module measures that instead of assuming it: :func:`graph_breaks` runs ``torch._dynamo.explain`` on a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgeon.errors import SurgeonError


@dataclass
class GraphBreaks:
    """What dynamo made of one forward: how many graphs, and why it broke between them."""

    graphs: int
    breaks: int
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.graphs} graph(s), {self.breaks} graph break(s)"


def check_backend(backend: str) -> str:
    """``backend`` if ``torch.compile`` knows it (debug backends such as ``aot_eager`` included)."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise SurgeonError(f"unknown torch.compile backend {backend!r}; one of {', '.join(sorted(known))}")
    return backend


def graph_breaks(model: nn.Module, example_input: torch.Tensor) -> GraphBreaks:
    """Trace ``model(example_input)`` with dynamo in the model's current mode (training mode traces the
    adapters' autograd functions) and report every graph break with the line that caused it."""
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(example_input)
    finally:
        torch._dynamo.reset()
    reasons = []
    for entry in explained.break_reasons:
        frame = entry.user_stack[-1] if entry.user_stack else None
        where = f"{frame.filename}:{frame.lineno}: " if frame is not None else ""
        reasons.append(where + (entry.reason.strip().splitlines() or [""])[0])
    return GraphBreaks(graphs=explained.graph_count, breaks=explained.graph_break_count, reasons=reasons)


def compiled_graph_counts() -> tuple[int, int]:
    """(graphs, graph breaks) dynamo has produced in this process so far: what ``adapt --compile`` reports after
    its first steps without tracing the model a second time."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))
