"""Which device's torch route surgeon's layers take on the CPU.

Some layers choose their computation by device: on the CPU, C++ kernels and CPU-only workarounds (dilated
depthwise backward as a dense conv, because PyTorch's CPU backward for dilated depthwise convs goes through an
im2col buffer); on CUDA, cuDNN's own dilated convs. Counting what a CUDA step launches can be done on the CPU, as
dispatch is the same on every device, but only if the CPU then takes CUDA's route: :func:`cuda_route` says so for
the code inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# process-wide, not per thread or context: a backward may run on one of autograd's own threads
_depth = 0


@contextmanager
def cuda_route() -> Iterator[None]:
    """Inside: every device takes the route a CUDA device takes (no CPU kernels, no CPU-only workarounds)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def takes_cpu_route(device: torch.device) -> bool:
    """Whether code on ``device`` runs the CPU's own route."""
    return device.type == "cpu" and _depth == 0
