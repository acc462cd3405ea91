"""Mixed precision inside surgeon's custom autograd functions.

Autocast changes the dtype of the convs and matmuls a forward runs, but not what a custom ``backward`` receives
or computes with. Each function therefore decides its compute dtype once, in forward (the autocast dtype of the
input's device, when autocast is on), runs in it with autocast off, keeps for backward only tensors of that dtype,
and casts every gradient back to the dtype of the input it belongs to. This holds on CPU and CUDA alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a conv or matmul on ``tensor`` runs in: autocast's low-precision dtype when it is on for the
    tensor's device, else the tensor's own dtype."""
    device = tensor.device.type
    if tensor.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


@contextmanager
def autocast_off(tensor: torch.Tensor) -> Iterator[None]:
    """Autocast disabled on the tensor's device: the function casts explicitly. Nothing is entered when autocast
    is already off (an autocast region inside a compiled autograd function breaks dynamo's graph)."""
    if not torch.is_autocast_enabled(tensor.device.type):
        yield
        return
    with torch.autocast(tensor.device.type, enabled=False):
        yield


def cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def grad_as(grad: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A gradient in the dtype of its input (autograd would cast it too; being explicit keeps it checkable)."""
    return grad if grad is None or dtype is None or grad.dtype == dtype else grad.to(dtype)
